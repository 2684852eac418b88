"""The counter's terminal in front of the platform: the phone on its reader, the keys at
the platform (wallet issue §5). The card's INITIALIZE FOR LOAD answer goes up, MAC2 comes
down, CREDIT FOR LOAD's TAC goes up; when the phone leaves before the TAC, GET TRANSACTION
PROVE settles it — the platform posts the money only for a verified TAC."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from reader_sim.link import CardRemoved, Link, exchange
from reader_sim.load_terminal import LoadRefused, start_load
from reader_sim.platform_client import PlatformClient
from sim_applet.apdu import SW
from sim_applet.structures import (
    TRANSIT_AID,
    TYPE_LOAD,
    CreditForLoadRequest,
    TransactionProof,
    get_transaction_prove,
    select_by_aid,
)


@dataclass(frozen=True)
class CounterLoaded:
    load_id: int
    serial: str
    amount_fen: int
    balance_after_fen: int


@dataclass(frozen=True)
class CounterRefused:
    reason: str


@dataclass(frozen=True)
class CounterInterrupted:
    """CREDIT FOR LOAD went out, no TAC came back: call ``recover`` when the phone is back."""

    load_id: int
    online_ctc: int
    amount_fen: int
    old_balance_fen: int
    serial: str


CounterResult = CounterLoaded | CounterRefused | CounterInterrupted


class CounterTerminal:
    def __init__(self, platform: PlatformClient, terminal_id: bytes) -> None:
        self.platform = platform
        self.terminal_id = terminal_id

    def load(self, link: Link, amount_fen: int) -> CounterResult:
        started = start_load(link, amount_fen, self.terminal_id)
        if isinstance(started, LoadRefused):
            return CounterRefused(f"{started.reason} ({started.sw:04X})")
        serial, card, data = started.serial.hex().upper(), started.card, started.raw
        authorized = self.platform.call(
            "POST",
            "/api/v1/counter/loads",
            {
                "card_serial": serial,
                "amount_fen": amount_fen,
                "terminal_id": self.terminal_id.hex().upper(),
                "init_response": data.hex(),
            },
            idempotency_key=str(uuid.uuid4()),
        )
        credit = CreditForLoadRequest(
            bytes.fromhex(authorized["date"]),
            bytes.fromhex(authorized["time"]),
            bytes.fromhex(authorized["mac2"]),
        )
        interrupted = CounterInterrupted(
            authorized["load_id"], card.online_ctc, amount_fen, card.old_balance, serial
        )
        try:
            tac, sw = exchange(link, credit.command())
        except CardRemoved:
            return interrupted
        if sw != SW.OK:
            self._report(interrupted, None)  # the card refused: nothing was credited
            return CounterRefused(f"card answered {sw:04X} to CREDIT FOR LOAD")
        self.platform.call(
            "POST",
            f"/api/v1/counter/loads/{interrupted.load_id}/confirm",
            {"tac": tac.hex().upper()},
            idempotency_key=f"confirm-{interrupted.load_id}",
        )
        return CounterLoaded(interrupted.load_id, serial, amount_fen, card.old_balance + amount_fen)

    def recover(self, link: Link, interrupted: CounterInterrupted) -> CounterResult:
        exchange(link, select_by_aid(TRANSIT_AID))
        data, sw = exchange(link, get_transaction_prove(TYPE_LOAD, interrupted.online_ctc + 1))
        if sw == SW.CONDITIONS_NOT_SATISFIED:
            self._report(interrupted, None)
            return CounterRefused("the load did not happen")
        if sw != SW.OK:
            return CounterRefused(f"card answered {sw:04X} to GET TRANSACTION PROVE")
        self._report(interrupted, TransactionProof.decode(data).tac)
        return CounterLoaded(
            interrupted.load_id,
            interrupted.serial,
            interrupted.amount_fen,
            interrupted.old_balance_fen + interrupted.amount_fen,
        )

    def _report(self, interrupted: CounterInterrupted, tac: bytes | None) -> None:
        self.platform.call(
            "POST",
            f"/api/v1/counter/loads/{interrupted.load_id}/resolve",
            {"proof_tac": tac.hex().upper() if tac else None},
            idempotency_key=f"resolve-{interrupted.load_id}",
        )
