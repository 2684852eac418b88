"""The top-up orders' OTA channel over SMS: each step's APDUs as one secured command packet
(otar), its counter the order's step id — strictly rising per card, and echoed in the PoR,
which ties every answer to its step. PoRs come back as SMS to the platform's short code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import String, bindparam, select
from sqlalchemy.orm import Session

from otar.keys import derive_keyset
from otar.packets import (
    CounterMode,
    Integrity,
    OtaKeyset,
    PorRequest,
    PorStatus,
    ProofOfReceipt,
    Spi,
    decode_por,
    encode_command,
)
from otar.remote_apdu import CompactResponse, encode_script
from otar.sim_side import ISD_TAR, TRANSIT_TAR
from otar.sms import COMMAND_UDH, RESPONSE_UDH
from reader_sim.smsc import Sms
from sim_applet.service_request import is_service_request
from wallet_service.models import Card
from wallet_service.services import cards, phone_requests, rekeys, topups
from wallet_service.services.registry import Context
from wallet_service.sms_gateway import SmsGateway

SECURITY = Spi()  # ciphered, CC, counter must be higher, PoR always, ciphered with CC
UNSECURED = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)


T = TypeVar("T")


class SmsOtaChannel:
    def __init__(self, gateway: SmsGateway, keyset_for: CardKeysets) -> None:
        self.gateway, self.keyset_for = gateway, keyset_for

    def build(
        self,
        card_serial: str,
        step: int,
        apdus: list[bytes],
        tar: bytes = TRANSIT_TAR,
        version: int | None = None,
    ) -> bytes:
        """The secured packet (keys looked up now, inside the caller's transaction)."""
        keyset = self.keyset_for(card_serial, version)
        return encode_command(keyset, SECURITY, tar, step, encode_script(apdus))

    def send_to_security_domain(
        self, phone: str, card_serial: str, step: int, apdus: list[bytes], version: int
    ) -> None:
        self.deliver(phone, self.build(card_serial, step, apdus, ISD_TAR, version))

    def deliver(self, phone: str, packet: bytes, udh: bytes = COMMAND_UDH) -> None:
        self.gateway.send(phone, packet, udh)

    def send(self, phone: str, card_serial: str, step: int, apdus: list[bytes]) -> None:
        self.deliver(phone, self.build(card_serial, step, apdus))

    def notify(self, phone: str, text: str) -> None:
        self.deliver(phone, encode_notice(text), b"")


class Outbox(SmsOtaChannel):
    """The transactional outbox: a step's packets wait here until the step's transaction
    has committed, and only then go out (``flush``). Sending inside the transaction would
    let a worker die after the SMS left but before its state was stored — the platform
    would forget a CREDIT it sent, and could load the card twice."""

    def __init__(self, channel: SmsOtaChannel) -> None:
        super().__init__(channel.gateway, channel.keyset_for)
        self.pending: list[tuple[str, bytes, bytes]] = []

    def deliver(self, phone: str, packet: bytes, udh: bytes = COMMAND_UDH) -> None:
        self.pending.append((phone, packet, udh))

    def mark(self) -> int:
        return len(self.pending)

    def discard_since(self, mark: int) -> None:
        """A unit of work rolled back (its savepoint): its packets must never leave."""
        del self.pending[mark:]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            self.gateway.send_many(pending)


notice_chars_max = 70  # one SMS in UCS2 (TS 23.038): 140 bytes


def encode_notice(text: str) -> bytes:
    """A text SMS to the passenger, UCS2 (the phone shows Chinese and English alike)."""
    return text[:notice_chars_max].encode("utf-16-be")


def committed_then_sent(
    run_in_transaction: Callable[[Callable[[Context], T]], T],
    channel_for: Callable[[Context], SmsOtaChannel],
    work: Callable[[Context, Outbox], T],
) -> T:
    """One unit of work in its own transaction; the packets it sends leave after the
    commit. A retried transaction starts again with an empty outbox."""
    outbox: list[Outbox] = []

    def in_transaction(ctx: Context) -> T:
        outbox[:] = [Outbox(channel_for(ctx))]
        return work(ctx, outbox[0])

    result = run_in_transaction(in_transaction)
    outbox[0].flush()
    return result


# Built once: asked for every PoR (built per call, a statement's expression tree and cache
# key cost more CPU than running it).
_CARD_OF_PHONE = (
    select(Card)
    .where(Card.phone == bindparam("phone", type_=String), Card.status.in_(("active", "lost")))
    .order_by((Card.status == "active").desc(), Card.id.desc())
    .limit(1)
)
_CARDS_OF_PHONES = (
    select(Card)
    .where(Card.phone.in_(bindparam("phones", expanding=True)), Card.status.in_(("active", "lost")))
    .order_by(Card.phone, (Card.status == "active").desc(), Card.id.desc())
)


class CardKeysets:
    """The OTA keysets of the cards one transaction deals with (called as
    ``keyset_for(card serial, version=None: the card's current)``). Each card is read
    once — a PoR's card by its phone, then the next packet to it — as the ORM's one object
    for that row: a rekey in the same transaction moves that object's key version, so a
    later packet is built under the new one."""

    def __init__(self, session: Session, masters: tuple[bytes, bytes]) -> None:
        self.session, self.masters = session, masters
        self.by_phone: dict[str, Card | None] = {}  # read ahead for a batch

    def card_of(self, phone: str) -> Card | None:
        """The phone's active card; else the one it reported lost (its answers may still
        settle a load under way — never start one)."""
        if phone in self.by_phone:
            return self.by_phone[phone]
        return self.session.scalar(_CARD_OF_PHONE, {"phone": phone})

    def read_phones(self, phones: set[str]) -> None:
        """The cards of these phones, in one query (a batch of SMS): ``card_of`` then
        answers from them, choosing as its own query does."""
        found = self.session.scalars(_CARDS_OF_PHONES, {"phones": sorted(phones)}).all()
        self.by_phone.update(dict.fromkeys(phones))
        for card in found:  # ordered as _CARD_OF_PHONE orders: the first one wins
            if self.by_phone[card.phone] is None:
                self.by_phone[card.phone] = card

    def __call__(self, card_serial: str, version: int | None = None) -> OtaKeyset:
        card = cards.find_card(self.session, card_serial)  # (loaded once a transaction)
        if card is None:
            raise LookupError(f"no card {card_serial}")
        return derived_keyset(*self.masters, card.iccid, version or card.ota_key_version)


# A card's keyset derived once per version in a process, not for every packet and proof
# (two AES blocks: some 4 % of the worker's CPU). The derivation is a pure function of the
# master keys, which the process holds anyway; a rekey asks for another version.
keysets_cached_max = 10_000
derived_keyset = functools.lru_cache(maxsize=keysets_cached_max)(derive_keyset)


def keyset_lookup(ctx: Context, masters: tuple[bytes, bytes]) -> CardKeysets:
    return CardKeysets(ctx.session, masters)


DEFAULT_BANK_MERCHANT = "BUSCARD"


def handle_incoming_sms(
    ctx: Context, channel: SmsOtaChannel, sms: Sms, merchant: str = DEFAULT_BANK_MERCHANT
) -> str:
    """A PoR from a phone → the order's next step; a request from the SIM's menu → an
    order or a loss report. Anything else is not ours."""
    if sms.udh == b"" and is_service_request(sms.user_data):
        return phone_requests.handle(ctx, channel, sms.sender, sms.user_data, merchant)
    if sms.udh != RESPONSE_UDH:
        return "not a proof of receipt"
    card = channel.keyset_for.card_of(sms.sender)
    if card is None:
        return "unknown phone"
    card_serial = card.serial
    if sms.user_data[3:6] == ISD_TAR:
        return rekeys.on_proof_of_receipt(ctx, channel, card_serial, sms.udh + sms.user_data)
    por = read_por(channel.keyset_for(card_serial), sms.udh + sms.user_data)
    if isinstance(por, str):
        return por
    if por.status is not PorStatus.OK:
        # e.g. a duplicated SMS the SIM refused as a replay: nothing ran, nothing changes
        return f"refused by the SIM: {por.status.name}"
    try:
        response = CompactResponse.decode(por.data)
    except ValueError:
        return "forged or damaged proof of receipt"
    return topups.on_proof_of_receipt(
        ctx, channel, card_serial, por.counter, response.last_response
    )


def read_ahead(ctx: Context, channel: SmsOtaChannel, messages: list[Sms]) -> None:
    """Ahead of a batch of SMS handled one by one (``handle_incoming_sms``): the senders'
    cards in one query; with proofs of receipt from several cards, the orders they answer
    locked and the ledger accounts their loads post to read, each in one query for all
    of them (with one card, its own queries cost as much: nothing to save)."""
    channel.keyset_for.read_phones({sms.sender for sms in messages})
    serials = set()
    for sms in messages:
        card = channel.keyset_for.card_of(sms.sender) if sms.udh == RESPONSE_UDH else None
        if card is not None:
            serials.add(card.serial)
    if len(serials) > 1:
        topups.ready_for_proofs(ctx, serials)


def read_por(keyset: OtaKeyset, raw: bytes) -> ProofOfReceipt | str:
    """The PoR under ``keyset``, or why not. A SIM answers a refused packet unsecured (it
    will not trust that packet's keys): read it so — but only a refusal may come so."""
    try:
        return decode_por(keyset, SECURITY, raw)
    except ValueError:
        pass
    try:
        por = decode_por(keyset, UNSECURED, raw)
    except ValueError:
        return "forged or damaged proof of receipt"
    if por.status is PorStatus.OK:
        return "forged or damaged proof of receipt"
    return por
