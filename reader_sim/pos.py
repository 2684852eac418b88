"""The bus POS: the card machine on the bus, with its PSAM and offline record store.

``present(link)`` is what happens when a phone (or a driver card) enters the field. A
driver card signs its driver in (or out); a transit card pays the route's flat fare:

    SELECT → READ 0x15 (serial, validity) → blacklist? APPLICATION BLOCK, refuse
    → torn DEBIT pending for this card? recover it (card-application.md §5)
    → tapped again within the window? not charged twice
    → INITIALIZE FOR PURCHASE → PSAM MAC1 → store pending → DEBIT → PSAM MAC2 → record

Every outcome is a value (``TapOutcome``); only programming errors raise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import Enum

from reader_sim.link import CardRemoved, Link, exchange
from reader_sim.psam import Mac1Request, Psam, block_mac_request, verify_driver_card, verify_mac2
from reader_sim.records import PendingDebit, RecordStore, StoreFull, TapRecord
from sim_applet.apdu import SW, CommandApdu, split_response
from sim_applet.driver_card import DRIVER_AID, DriverData, internal_authenticate
from sim_applet.structures import (
    GET_CHALLENGE,
    SFI_LOG,
    SFI_PUBLIC,
    TRANSIT_AID,
    TYPE_PURCHASE,
    DebitForPurchaseRequest,
    DebitForPurchaseResponse,
    InitializeForPurchaseResponse,
    InitializeRequest,
    LogRecord,
    PublicData,
    TransactionProof,
    bcd_date,
    bcd_time,
    get_transaction_prove,
    initialize_for_purchase,
    log_records_max,
    read_binary,
    read_record,
    select_by_aid,
)

PURCHASE_KEY_INDEX = 1
repeat_tap_window_s_default = 10


class Outcome(Enum):
    PAID = "paid"
    RECOVERED = "recovered"  # a torn tap found complete: paid once, not charged again
    ALREADY_PAID = "already paid"
    SIGNED_IN = "driver signed in"
    SIGNED_OUT = "driver signed out"
    CARD_REMOVED = "card removed: tap again"
    REFUSED = "refused"


class Refusal(Enum):
    NO_DRIVER = "no driver signed in"
    NOT_A_BUS_CARD = "not a bus card"
    CARD_BLOCKED = "card blocked"
    BLACKLISTED = "card reported lost: blocked"
    NOT_YET_VALID = "card not yet valid"
    EXPIRED = "card expired"
    INSUFFICIENT_FUNDS = "insufficient balance"
    STORE_FULL = "record store full: upload needed"
    CARD_NOT_AUTHENTIC = "card failed authentication"
    DRIVER_CARD_INVALID = "driver card not valid on this bus"
    CARD_ERROR = "card error"


@dataclass(frozen=True)
class TapOutcome:
    outcome: Outcome
    refusal: Refusal | None = None
    record: TapRecord | None = None
    balance: int | None = None
    detail: str = ""

    @property
    def message(self) -> str:
        text = self.refusal.value if self.refusal else self.outcome.value
        if self.balance is not None:
            text += f", balance {self.balance / 100:.2f}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class PosConfig:
    operator: str
    route: str
    vehicle: str
    fare_fen: int
    repeat_tap_window_s: int = repeat_tap_window_s_default
    blacklist: set[bytes] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0 <= self.fare_fen <= 0xFFFFFFFF:
            raise ValueError("fare_fen must be 0..4294967295")
        if self.repeat_tap_window_s < 0:
            raise ValueError("repeat_tap_window_s must be >= 0")


class _CardAnswered(Exception):
    """An unexpected status word from the card: ends the tap as a refusal."""

    def __init__(self, sw: int, refusal: Refusal = Refusal.CARD_ERROR) -> None:
        super().__init__(f"SW {sw:04X}")
        self.sw = sw
        self.refusal = refusal


@dataclass
class _Driver:
    driver_id: str
    card_serial: bytes


class BusPos:
    def __init__(
        self,
        config: PosConfig,
        psam: Psam,
        store: RecordStore,
        *,
        clock: Callable[[], datetime] = datetime.now,
        random_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.psam = psam
        self.store = store
        self.clock = clock
        self.random = random_source
        psam.terminal_seq = store.next_terminal_seq(psam.terminal_seq)
        self.downloaded_blacklist = store.blacklist()[1]  # survives restarts
        signed_in = store.signed_in_driver()  # a restart does not sign the driver out
        self.driver: _Driver | None = _Driver(*signed_in) if signed_in else None

    @property
    def terminal_id(self) -> bytes:
        return self.psam.terminal_id

    def present(self, link: Link) -> TapOutcome:
        """A card enters the field; the answer is what the POS shows and beeps."""
        try:
            return self._present(link)
        except CardRemoved:
            return TapOutcome(Outcome.CARD_REMOVED)
        except _CardAnswered as answered:
            return TapOutcome(Outcome.REFUSED, answered.refusal, detail=str(answered))

    def _present(self, link: Link) -> TapOutcome:
        _, sw = exchange(link, select_by_aid(TRANSIT_AID))
        if sw == SW.FILE_NOT_FOUND:
            return self._driver_card(link)
        if sw == SW.SELECTED_APPLICATION_BLOCKED:
            return _refused(Refusal.CARD_BLOCKED)
        _expect_ok(sw)
        if self.driver is None:
            return _refused(Refusal.NO_DRIVER)
        public = PublicData.decode(_ok(link, read_binary(SFI_PUBLIC, 0, 30)))
        now = self.clock()
        refusal = self._validity(public, now.date())
        if refusal is not None:
            return _refused(refusal)
        if public.serial in self.config.blacklist or public.serial in self.downloaded_blacklist:
            self._block(link, public.serial)
            return _refused(Refusal.BLACKLISTED)
        for pending in self.store.pending_for(public.serial):
            recovered = self._recover(link, pending)
            if recovered is not None:
                return recovered
        last = self.store.last_fare_at(public.serial)
        if last is not None and now - last < timedelta(seconds=self.config.repeat_tap_window_s):
            return TapOutcome(Outcome.ALREADY_PAID)
        return self._purchase(link, public.serial, now)

    @staticmethod
    def _validity(public: PublicData, today: date) -> Refusal | None:
        if today < public.start_date:
            return Refusal.NOT_YET_VALID
        if today > public.expiry_date:
            return Refusal.EXPIRED
        return None

    # --- a fare --------------------------------------------------------------------------

    def _purchase(self, link: Link, serial: bytes, now: datetime) -> TapOutcome:
        if self.store.full:
            return _refused(Refusal.STORE_FULL)
        fare = self.config.fare_fen
        request = InitializeRequest(PURCHASE_KEY_INDEX, fare, self.terminal_id)
        data, sw = exchange(link, initialize_for_purchase(request))
        if sw == SW.INSUFFICIENT_FUNDS:
            return _refused(Refusal.INSUFFICIENT_FUNDS)
        _expect_ok(sw)
        card = InitializeForPurchaseResponse.decode(data)
        date_bcd, time_bcd = bcd_date(now), bcd_time(now)
        mac1_request = Mac1Request(
            card.random,
            card.offline_ctc,
            fare,
            TYPE_PURCHASE,
            date_bcd,
            time_bcd,
            card.key_version,
            card.algorithm,
            serial,
        )
        psam_answer = _psam_ok(self.psam, mac1_request.command())
        terminal_seq = int.from_bytes(psam_answer[:4], "big")
        mac1 = psam_answer[4:8]
        assert self.driver is not None
        pending = PendingDebit(
            serial,
            card.offline_ctc,
            fare,
            card.balance,
            TYPE_PURCHASE,
            self.terminal_id,
            terminal_seq,
            now.replace(microsecond=0),
            card.key_version,
            card.algorithm,
            self.driver.driver_id,
        )
        try:
            self.store.begin_debit(pending, self.psam.terminal_seq)
        except StoreFull:
            return _refused(Refusal.STORE_FULL)
        debit = DebitForPurchaseRequest(terminal_seq, date_bcd, time_bcd, mac1).command()
        data, sw = exchange(link, debit)  # CardRemoved here leaves the pending for §5
        if sw != SW.OK:
            self.store.abandon_debit(pending)  # the card refused: nothing was debited
            raise _CardAnswered(sw)
        answer = DebitForPurchaseResponse.decode(data)
        mac2_ok = self.psam.transmit(verify_mac2(answer.mac2).encode())[-2:] == b"\x90\x00"
        record = self._record(pending, answer.tac, answer.mac2, mac2_ok, recovered=False)
        self.store.complete_debit(record)
        if not mac2_ok:
            # Money left the card, so the record is kept for clearing to judge its TAC;
            # the passenger is not let on with a card that failed to authenticate.
            return TapOutcome(Outcome.REFUSED, Refusal.CARD_NOT_AUTHENTIC, record)
        return TapOutcome(Outcome.PAID, record=record, balance=record.balance_after)

    def _record(
        self, pending: PendingDebit, tac: bytes, mac2: bytes, mac2_ok: bool, *, recovered: bool
    ) -> TapRecord:
        return TapRecord(
            terminal_id=pending.terminal_id,
            terminal_seq=pending.terminal_seq,
            card_serial=pending.card_serial,
            ctc=pending.ctc,
            amount=pending.amount,
            balance_before=pending.balance_before,
            balance_after=pending.balance_before - pending.amount,
            transaction_type=pending.transaction_type,
            occurred_at=pending.occurred_at,
            tac=tac,
            mac2=mac2,
            mac2_verified=mac2_ok,
            key_version=pending.key_version,
            algorithm=pending.algorithm,
            operator=self.config.operator,
            route=self.config.route,
            vehicle=self.config.vehicle,
            driver=pending.driver,
            recovered=recovered,
        )

    def _recover(self, link: Link, pending: PendingDebit) -> TapOutcome | None:
        """The card is back after a torn DEBIT (card-application.md §5). Compare its offline
        CTC with the one the DEBIT used: unchanged means it never debited; moved on means
        the log entry with that CTC tells whether the debit was ours — if so, fetch its
        MAC2 and TAC and complete the record. Returns None when the tap should go on as
        a new fare."""
        ctc_now = self._probe(link).offline_ctc
        if ctc_now == pending.ctc:
            self.store.abandon_debit(pending)
            return None
        entry = self._log_entry(link, pending) if ctc_now > pending.ctc else None
        if entry is None:
            # The card moved on further than its 10-record log shows (or went back, an
            # anomaly): keep the pending for clearing to resolve from the uploads.
            return None
        if not self._is_ours(entry, pending):
            self.store.abandon_debit(pending)
            return None
        data = _ok(link, get_transaction_prove(pending.transaction_type, pending.ctc + 1))
        proof = TransactionProof.decode(data)
        record = self._record(pending, proof.tac, proof.mac2, False, recovered=True)
        self.store.complete_debit(record)
        return TapOutcome(Outcome.RECOVERED, record=record, balance=record.balance_after)

    def _probe(self, link: Link) -> InitializeForPurchaseResponse:
        """A zero-amount INITIALIZE FOR PURCHASE: balance, CTC and algorithm, nothing changed
        (the next command cancels it)."""
        probe = InitializeRequest(PURCHASE_KEY_INDEX, 0, self.terminal_id)
        return InitializeForPurchaseResponse.decode(_ok(link, initialize_for_purchase(probe)))

    @staticmethod
    def _log_entry(link: Link, pending: PendingDebit) -> LogRecord | None:
        for number in range(1, log_records_max + 1):
            data, sw = exchange(link, read_record(SFI_LOG, number, 23))
            if sw != SW.OK:
                return None
            entry = LogRecord.decode(data)
            if entry.transaction_type == pending.transaction_type and entry.ctc == pending.ctc:
                return entry
        return None

    def _is_ours(self, entry: LogRecord, pending: PendingDebit) -> bool:
        return (
            entry.terminal_id == pending.terminal_id
            and entry.amount == pending.amount
            and entry.when == pending.occurred_at
        )

    def _block(self, link: Link, serial: bytes) -> None:
        """APPLICATION BLOCK a blacklisted card, its MAC from the PSAM. The probe tells the
        card's algorithm; GET CHALLENGE then gives the challenge the MAC covers."""
        algorithm = self._probe(link).algorithm
        challenge = _ok(link, GET_CHALLENGE)
        mac = _psam_ok(self.psam, block_mac_request(serial, algorithm, challenge))
        _ok(link, CommandApdu(0x84, 0x1E, 0x00, 0x00, mac))

    # --- drivers -------------------------------------------------------------------------

    def _driver_card(self, link: Link) -> TapOutcome:
        _, sw = exchange(link, select_by_aid(DRIVER_AID))
        if sw == SW.FILE_NOT_FOUND:
            return _refused(Refusal.NOT_A_BUS_CARD)
        _expect_ok(sw)
        driver = DriverData.decode(_ok(link, read_binary(SFI_PUBLIC, 0, 64)))
        now = self.clock()
        if driver.operator_id != self.config.operator or now.date() > driver.expiry_date:
            return _refused(Refusal.DRIVER_CARD_INVALID)
        challenge = self.random(8)
        cryptogram = _ok(link, internal_authenticate(challenge))
        answer = self.psam.transmit(
            verify_driver_card(driver.serial, challenge, cryptogram).encode()
        )
        if answer[-2:] != b"\x90\x00":
            return _refused(Refusal.DRIVER_CARD_INVALID)
        signing_out = self.driver is not None and self.driver.card_serial == driver.serial
        event = "sign_out" if signing_out else "sign_in"
        self.store.add_sign_in(
            terminal_id=self.terminal_id,
            driver=driver.driver_id,
            card_serial=driver.serial,
            operator=self.config.operator,
            vehicle=self.config.vehicle,
            event=event,
            occurred_at=now.replace(microsecond=0),
        )
        if signing_out:
            self.driver = None
            return TapOutcome(Outcome.SIGNED_OUT, detail=driver.name)
        self.driver = _Driver(driver.driver_id, driver.serial)
        return TapOutcome(Outcome.SIGNED_IN, detail=driver.name)


def _refused(refusal: Refusal) -> TapOutcome:
    return TapOutcome(Outcome.REFUSED, refusal)


def _expect_ok(sw: int) -> None:
    if sw != SW.OK:
        raise _CardAnswered(sw)


def _ok(link: Link, command: CommandApdu) -> bytes:
    data, sw = exchange(link, command)
    _expect_ok(sw)
    return data


def _psam_ok(psam: Psam, command: CommandApdu) -> bytes:
    data, sw = split_response(psam.transmit(command.encode()))
    if sw != SW.OK:
        raise _CardAnswered(sw, Refusal.CARD_ERROR)
    return data
