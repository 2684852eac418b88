"""A load terminal: the counter's reader that credits a card (card-application.md §2–§3).

Given the issuer's keys it plays the whole online load itself — for tests, the demo and
testers' scripts. The platform takes the key role later (the counter top-up issue), using
the same ``sim_applet.issuer`` functions.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from reader_sim.link import CardRemoved, Link, exchange
from sim_applet.apdu import SW
from sim_applet.issuer import LoadAuthorization, Mac1Invalid, authorize_load
from sim_applet.personalize import IssuerKeys
from sim_applet.structures import (
    SFI_PUBLIC,
    TRANSIT_AID,
    TYPE_LOAD,
    CreditForLoadRequest,
    InitializeForLoadResponse,
    InitializeRequest,
    PublicData,
    TransactionProof,
    bcd_date,
    bcd_time,
    get_transaction_prove,
    initialize_for_load,
    read_binary,
    select_by_aid,
)

LOAD_KEY_INDEX = 1


@dataclass(frozen=True)
class Loaded:
    serial: bytes
    amount: int
    balance_after: int
    online_ctc: int  # the value INITIALIZE returned
    tac: bytes


@dataclass(frozen=True)
class LoadRefused:
    sw: int
    reason: str


@dataclass(frozen=True)
class LoadInterrupted:
    """CREDIT FOR LOAD was sent and no answer came: ``recover`` tells what happened."""

    authorization: LoadAuthorization
    date_bcd: bytes
    time_bcd: bytes


LoadResult = Loaded | LoadRefused | LoadInterrupted

_REASONS = {
    SW.AMOUNT_OR_BALANCE_LIMIT: "amount or balance limit",
    SW.SELECTED_APPLICATION_BLOCKED: "card blocked",
    SW.CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW.KEY_INDEX_NOT_SUPPORTED: "key index not supported",
    SW.MAC_INVALID: "MAC invalid",
}


@dataclass(frozen=True)
class LoadStarted:
    """SELECT, READ 0x15 and INITIALIZE FOR LOAD went through: the card waits for CREDIT."""

    serial: bytes
    card: InitializeForLoadResponse
    raw: bytes  # the INITIALIZE answer's data, as a host verifies it


def start_load(link: Link, amount: int, terminal_id: bytes) -> LoadStarted | LoadRefused:
    """The first half of every online load, whoever holds the keys (this terminal, or the
    platform behind a counter terminal)."""
    _, sw = exchange(link, select_by_aid(TRANSIT_AID))
    if sw != SW.OK:
        return LoadRefused(sw, _REASONS.get(sw, "not a transit card"))
    data, sw = exchange(link, read_binary(SFI_PUBLIC, 0, 30))
    if sw != SW.OK:
        return LoadRefused(sw, "cannot read the card")
    serial = PublicData.decode(data).serial
    request = InitializeRequest(LOAD_KEY_INDEX, amount, terminal_id)
    data, sw = exchange(link, initialize_for_load(request))
    if sw != SW.OK:
        return LoadRefused(sw, _REASONS.get(sw, "card refused the load"))
    return LoadStarted(serial, InitializeForLoadResponse.decode(data), data)


class LoadTerminal:
    def __init__(
        self,
        issuer: IssuerKeys,
        terminal_id: bytes,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        assert len(terminal_id) == 6
        self.issuer = issuer
        self.terminal_id = terminal_id
        self.clock = clock

    def load(self, link: Link, amount: int) -> LoadResult:
        if not 0 < amount <= 0xFFFFFFFF:
            return LoadRefused(SW.AMOUNT_OR_BALANCE_LIMIT, "amount must be 1..4294967295 fen")
        started = start_load(link, amount, self.terminal_id)
        if isinstance(started, LoadRefused):
            return started
        serial, card = started.serial, started.card
        try:
            authorization = authorize_load(self.issuer, serial, amount, self.terminal_id, card)
        except Mac1Invalid as error:
            return LoadRefused(SW.MAC_INVALID, str(error))
        now = self.clock()
        date_bcd, time_bcd = bcd_date(now), bcd_time(now)
        credit = CreditForLoadRequest(date_bcd, time_bcd, authorization.mac2(date_bcd, time_bcd))
        interrupted = LoadInterrupted(authorization, date_bcd, time_bcd)
        try:
            tac, sw = exchange(link, credit.command())
        except CardRemoved:
            return interrupted
        if sw != SW.OK:
            return LoadRefused(sw, _REASONS.get(sw, "card refused the credit"))
        return self._confirmed(interrupted, tac)

    def recover(self, link: Link, interrupted: LoadInterrupted) -> LoadResult:
        """The card is back: GET TRANSACTION PROVE for the load's CTC + 1. A proof means the
        load happened (its TAC is checked); `69 85` means it did not."""
        card = interrupted.authorization.card
        _, sw = exchange(link, select_by_aid(TRANSIT_AID))
        if sw != SW.OK:
            return LoadRefused(sw, "cannot select the card")
        data, sw = exchange(link, get_transaction_prove(TYPE_LOAD, card.online_ctc + 1))
        if sw == SW.CONDITIONS_NOT_SATISFIED:
            return LoadRefused(sw, "the load did not happen")
        if sw != SW.OK:
            return LoadRefused(sw, "card refused GET TRANSACTION PROVE")
        return self._confirmed(interrupted, TransactionProof.decode(data).tac)

    def _confirmed(self, interrupted: LoadInterrupted, tac: bytes) -> LoadResult:
        authorization = interrupted.authorization
        expected = authorization.expected_tac(
            self.issuer, interrupted.date_bcd, interrupted.time_bcd
        )
        if not hmac.compare_digest(expected, tac):
            return LoadRefused(SW.MAC_INVALID, "TAC does not verify: the card is not genuine")
        card = authorization.card
        return Loaded(
            authorization.serial,
            authorization.amount,
            card.old_balance + authorization.amount,
            card.online_ctc,
            tac,
        )
