"""The transit e-purse application (PBOC EP, JT/T 978 profile), card-application.md §1–§5.

One door: ``process(command, context) -> (data, SW)``. The session (which transaction is
pending) moves only through ``TRANSITIONS``; a command the table does not allow answers
`69 85`. Persistent data lives in ``PurseState`` and changes only through an atomic
``Transaction``; the session is volatile and vanishes at power-off or reset.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar

from sim_applet import crypto
from sim_applet.apdu import SW, ApduError, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.nvm import Power, Transaction
from sim_applet.structures import (
    APPLICATION_BLOCK_HEADER,
    APPLICATION_UNBLOCK_HEADER,
    SFI_CAPP,
    SFI_HOLDER,
    SFI_LOG,
    SFI_PUBLIC,
    TRANSIT_AID,
    TRANSIT_FID,
    TYPE_CAPP_PURCHASE,
    TYPE_LOAD,
    TYPE_PURCHASE,
    CreditForLoadRequest,
    DebitForPurchaseRequest,
    DebitForPurchaseResponse,
    InitializeForLoadResponse,
    InitializeForPurchaseResponse,
    InitializeRequest,
    LogRecord,
    PublicData,
    TransactionProof,
    log_records_max,
)

proofs_max = log_records_max  # a proof is kept as long as its log record
capp_records_max = 4
capp_record_bytes_max = 48
pin_bytes_min, pin_bytes_max = 2, 6
ctc_max = 0xFFFF
default_balance_limit_fen = 100_000  # 1000.00 yuan, card-application.md §1


@dataclass(frozen=True)
class PurseKeys:
    """The card's diversified keys (card-application.md §3), one key version and index."""

    algorithm: Algorithm
    key_version: int
    key_index: int
    dlk: bytes  # load
    dpk: bytes  # purchase
    dtk: bytes  # TAC
    damk: bytes  # application maintenance
    dpuk: bytes  # PIN unblock

    def __repr__(self) -> str:  # keys never reach a log
        return f"PurseKeys({self.algorithm.label}, version {self.key_version}, <hidden>)"


@dataclass(frozen=True)
class Proof:
    transaction_type: int
    ctc_after: int
    mac2: bytes
    tac: bytes


@dataclass
class PurseState:
    """Everything the purse keeps across power cycles."""

    keys: PurseKeys
    public_data: bytes
    holder_data: bytes = field(repr=False)  # real-name data: read needs the PIN
    pin: bytes = field(repr=False)  # never in a log
    pin_tries_max: int = 3
    pin_tries_left: int = 3
    balance: int = 0
    balance_limit: int = default_balance_limit_fen
    overdraft_limit: int = 0
    online_ctc: int = 0
    offline_ctc: int = 0
    log: tuple[bytes, ...] = ()  # newest first, SFI 0x18
    proofs: tuple[Proof, ...] = ()  # newest first
    capp_records: tuple[bytes, ...] = field(default_factory=lambda: (b"",) * capp_records_max)
    blocked: bool = False

    @property
    def serial(self) -> bytes:
        return PublicData.decode(self.public_data).serial


class Session(Enum):
    IDLE = auto()
    LOAD = auto()
    PURCHASE = auto()
    CAPP = auto()
    CAPP_CACHED = auto()


class Command(Enum):
    GET_BALANCE = auto()
    INITIALIZE_FOR_LOAD = auto()
    CREDIT_FOR_LOAD = auto()
    INITIALIZE_FOR_PURCHASE = auto()
    INITIALIZE_FOR_CAPP_PURCHASE = auto()
    UPDATE_CAPP_DATA_CACHE = auto()
    DEBIT_FOR_PURCHASE = auto()
    GET_TRANSACTION_PROVE = auto()
    READ_BINARY = auto()
    READ_RECORD = auto()
    VERIFY_PIN = auto()
    CHANGE_PIN = auto()
    GET_CHALLENGE = auto()
    APPLICATION_BLOCK = auto()
    APPLICATION_UNBLOCK = auto()


# (CLA, INS) → command; INS 50 is split by P1 (card-application.md §2).
_COMMANDS: dict[tuple[int, int], Command] = {
    (0x80, 0x5C): Command.GET_BALANCE,
    (0x80, 0x52): Command.CREDIT_FOR_LOAD,
    (0x80, 0xDC): Command.UPDATE_CAPP_DATA_CACHE,
    (0x80, 0x54): Command.DEBIT_FOR_PURCHASE,
    (0x80, 0x5A): Command.GET_TRANSACTION_PROVE,
    (0x00, 0xB0): Command.READ_BINARY,
    (0x00, 0xB2): Command.READ_RECORD,
    (0x00, 0x20): Command.VERIFY_PIN,
    (0x80, 0x5E): Command.CHANGE_PIN,
    (0x00, 0x84): Command.GET_CHALLENGE,
    (0x84, 0x1E): Command.APPLICATION_BLOCK,
    (0x84, 0x18): Command.APPLICATION_UNBLOCK,
}
_INITIALIZE_BY_P1 = {
    0x00: Command.INITIALIZE_FOR_LOAD,
    0x01: Command.INITIALIZE_FOR_PURCHASE,
    0x03: Command.INITIALIZE_FOR_CAPP_PURCHASE,
}
_KNOWN_INS = {ins for _, ins in _COMMANDS} | {0x50}

# The session transition table. A completion command is allowed only from the session its
# INITIALIZE opened; every other command is allowed anywhere and cancels a pending
# transaction first ("an INITIALIZE followed by anything but its own completion command
# cancels the transaction", card-application.md §2).
_COMPLETIONS: dict[tuple[Session, Command], Session] = {
    (Session.LOAD, Command.CREDIT_FOR_LOAD): Session.IDLE,
    (Session.PURCHASE, Command.DEBIT_FOR_PURCHASE): Session.IDLE,
    (Session.CAPP, Command.UPDATE_CAPP_DATA_CACHE): Session.CAPP_CACHED,
    (Session.CAPP, Command.DEBIT_FOR_PURCHASE): Session.IDLE,
    (Session.CAPP_CACHED, Command.DEBIT_FOR_PURCHASE): Session.IDLE,
}
_OPENS = {
    Command.INITIALIZE_FOR_LOAD: Session.LOAD,
    Command.INITIALIZE_FOR_PURCHASE: Session.PURCHASE,
    Command.INITIALIZE_FOR_CAPP_PURCHASE: Session.CAPP,
}
_COMPLETION_COMMANDS = {command for _, command in _COMPLETIONS}
# Refused while the application is blocked (card-application.md §2: "purses refuse").
_REFUSED_WHEN_BLOCKED = set(_OPENS) | _COMPLETION_COMMANDS


def next_session(session: Session, command: Command) -> Session | None:
    """The session after ``command`` succeeds, or None when the table forbids it."""
    if command in _COMPLETION_COMMANDS:
        return _COMPLETIONS.get((session, command))
    return _OPENS.get(command, Session.IDLE)


@dataclass
class _Pending:
    """What INITIALIZE remembered for its completion command (volatile)."""

    transaction_type: int
    amount: int
    terminal_id: bytes
    random: bytes
    ctc: int
    balance: int
    session_key: bytes = b""  # load only: the purchase key needs the terminal seq first
    capp_update: tuple[int, bytes] | None = None


@dataclass
class CardContext:
    """What the SIM lends an application for one command: its power and its randomness."""

    power: Power
    random: Callable[[int], bytes]


Response = tuple[bytes, int]
Handler = Callable[["TransitPurse", CommandApdu, CardContext], Response]


class TransitPurse:
    aid = TRANSIT_AID
    fid = TRANSIT_FID
    kind = "transit_purse"

    def __init__(self, state: PurseState) -> None:
        self.state = state
        self.reset()

    # --- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Power-off, reset or deselection: forget the session, the PIN and the challenge."""
        self.session = Session.IDLE
        self.pending: _Pending | None = None
        self.pin_verified = False
        self.challenge: bytes | None = None

    def select(self) -> Response:
        self.reset()
        fci = self._fci()
        return fci, SW.SELECTED_APPLICATION_BLOCKED if self.state.blocked else SW.OK

    def _fci(self) -> bytes:
        """FCI template `6F`: `84` DF name, `A5` proprietary data (card-application.md §1):
        `9F08` application version and `BF0C` issuer data (the public file, so a reader
        learns the serial from SELECT alone)."""
        version = bytes((PublicData.decode(self.state.public_data).app_version,))
        issuer_data = _tlv(b"\xbf\x0c", self.state.public_data)
        proprietary = _tlv(b"\xa5", _tlv(b"\x9f\x08", version) + issuer_data)
        return _tlv(b"\x6f", _tlv(b"\x84", self.aid) + proprietary)

    # --- the door --------------------------------------------------------------------------

    def process(self, apdu: CommandApdu, context: CardContext) -> Response:
        try:
            command = self._identify(apdu)
        except ApduError:
            self._cancel()  # an unknown command is "anything but its own completion" too
            raise
        after = next_session(self.session, command)
        if after is None:
            self._cancel()
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, f"{command.name} without INITIALIZE")
        if command not in _COMPLETION_COMMANDS:
            self._cancel()
        if self.state.blocked and command in _REFUSED_WHEN_BLOCKED:
            self._cancel()
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "application blocked")
        handler = self._handlers[command]
        try:
            result = handler(self, apdu, context)
        except ApduError:
            self._cancel()
            raise
        self.session = after
        if after is Session.IDLE:
            self.pending = None
        return result

    def _cancel(self) -> None:
        self.session = Session.IDLE
        self.pending = None

    cancel_transaction = _cancel

    @staticmethod
    def _identify(apdu: CommandApdu) -> Command:
        if apdu.ins not in _KNOWN_INS:
            raise ApduError(SW.INS_NOT_SUPPORTED)
        if apdu.ins == 0x50:
            if apdu.cla != 0x80:
                raise ApduError(SW.CLA_NOT_SUPPORTED)
            if apdu.p1 not in _INITIALIZE_BY_P1 or apdu.p2 != 0x02:
                raise ApduError(SW.WRONG_P1_P2, "INITIALIZE P1/P2")
            return _INITIALIZE_BY_P1[apdu.p1]
        command = _COMMANDS.get((apdu.cla, apdu.ins))
        if command is None:
            raise ApduError(SW.CLA_NOT_SUPPORTED)
        return command

    # --- balance and files ---------------------------------------------------------------

    def _get_balance(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x00, 0x02)
        _expect_no_data(apdu)
        return self.state.balance.to_bytes(4, "big"), SW.OK

    def _read_binary(self, apdu: CommandApdu, context: CardContext) -> Response:
        if not apdu.p1 & 0x80 or apdu.p1 & 0x60:
            raise ApduError(SW.WRONG_P1_P2, "READ BINARY needs an SFI in P1")
        _expect_no_data(apdu)
        sfi = apdu.p1 & 0x1F
        if sfi == SFI_PUBLIC:
            content = self.state.public_data
        elif sfi == SFI_HOLDER:
            if not self.pin_verified:
                raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "cardholder data needs the PIN")
            content = self.state.holder_data
        else:
            raise ApduError(SW.FILE_NOT_FOUND)
        return _slice_for_le(content, apdu.p2, apdu.le), SW.OK

    def _read_record(self, apdu: CommandApdu, context: CardContext) -> Response:
        if apdu.p2 & 0x07 != 0x04 or apdu.p1 == 0:
            raise ApduError(SW.WRONG_P1_P2, "READ RECORD P1 = record, P2 = SFI<<3 | 4")
        _expect_no_data(apdu)
        sfi = apdu.p2 >> 3
        if sfi == SFI_LOG:
            records = self.state.log
        elif sfi == SFI_CAPP:
            records = tuple(r for r in self.state.capp_records)
        else:
            raise ApduError(SW.FILE_NOT_FOUND)
        if apdu.p1 > len(records) or not records[apdu.p1 - 1]:
            raise ApduError(SW.RECORD_NOT_FOUND)
        return _slice_for_le(records[apdu.p1 - 1], 0, apdu.le), SW.OK

    # --- load ----------------------------------------------------------------------------

    def _initialize_for_load(self, apdu: CommandApdu, context: CardContext) -> Response:
        request = self._initialize_request(apdu)
        state = self.state
        if request.amount == 0 or state.balance + request.amount > state.balance_limit:
            raise ApduError(SW.AMOUNT_OR_BALANCE_LIMIT, "load over the balance limit")
        if state.online_ctc >= ctc_max:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "online CTC exhausted")
        keys = state.keys
        random = context.random(4)
        context.power.step()
        session_key = crypto.load_session_key(keys.algorithm, keys.dlk, random, state.online_ctc)
        mac1 = crypto.cbc_mac(
            keys.algorithm,
            session_key,
            state.balance.to_bytes(4, "big")
            + request.amount.to_bytes(4, "big")
            + bytes((TYPE_LOAD,))
            + request.terminal_id,
        )
        self.pending = _Pending(
            TYPE_LOAD,
            request.amount,
            request.terminal_id,
            random,
            state.online_ctc,
            state.balance,
            session_key,
        )
        answer = InitializeForLoadResponse(
            state.balance, state.online_ctc, keys.key_version, keys.algorithm, random, mac1
        )
        return answer.encode(), SW.OK

    def _credit_for_load(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x00, 0x00)
        request = _decode(CreditForLoadRequest, apdu.data)
        pending = self.pending
        assert pending is not None and pending.transaction_type == TYPE_LOAD
        keys = self.state.keys
        signed = (
            pending.amount.to_bytes(4, "big")
            + bytes((TYPE_LOAD,))
            + pending.terminal_id
            + request.date_bcd
            + request.time_bcd
        )
        expected_mac2 = crypto.cbc_mac(keys.algorithm, pending.session_key, signed)
        context.power.step()
        if not hmac.compare_digest(expected_mac2, request.mac2):
            raise ApduError(SW.MAC_INVALID, "MAC2")
        new_balance = pending.balance + pending.amount
        tac = crypto.cbc_mac(
            keys.algorithm,
            crypto.tac_key(keys.algorithm, keys.dtk),
            new_balance.to_bytes(4, "big") + pending.ctc.to_bytes(2, "big") + signed,
        )
        record = LogRecord(
            pending.ctc,
            self.state.overdraft_limit,
            pending.amount,
            TYPE_LOAD,
            pending.terminal_id,
            request.date_bcd,
            request.time_bcd,
        )
        transaction = Transaction(self.state, context.power)
        transaction.write("balance", new_balance)
        transaction.write("online_ctc", pending.ctc + 1)
        self._write_log(transaction, record, Proof(TYPE_LOAD, pending.ctc + 1, request.mac2, tac))
        transaction.commit()
        return tac, SW.OK

    # --- purchase ------------------------------------------------------------------------

    def _initialize_for_purchase(self, apdu: CommandApdu, context: CardContext) -> Response:
        request = self._initialize_request(apdu)
        state = self.state
        # The balance is unsigned (card-application.md §1): the overdraft limit is reported
        # in INITIALIZE and the log, but a purchase never takes the balance below zero.
        if request.amount > state.balance:
            raise ApduError(SW.INSUFFICIENT_FUNDS)
        if state.offline_ctc >= ctc_max:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "offline CTC exhausted")
        random = context.random(4)
        context.power.step()
        transaction_type = TYPE_CAPP_PURCHASE if apdu.p1 == 0x03 else TYPE_PURCHASE
        self.pending = _Pending(
            transaction_type,
            request.amount,
            request.terminal_id,
            random,
            state.offline_ctc,
            state.balance,
        )
        keys = state.keys
        answer = InitializeForPurchaseResponse(
            state.balance,
            state.offline_ctc,
            state.overdraft_limit,
            keys.key_version,
            keys.algorithm,
            random,
        )
        return answer.encode(), SW.OK

    def _update_capp_data_cache(self, apdu: CommandApdu, context: CardContext) -> Response:
        sfi, record = apdu.p2 >> 3, apdu.p1
        if apdu.p2 & 0x07 != 0 or sfi != SFI_CAPP or not 1 <= record <= capp_records_max:
            raise ApduError(SW.WRONG_P1_P2, "UPDATE CAPP DATA CACHE record/SFI")
        if not 1 <= len(apdu.data) <= capp_record_bytes_max:
            raise ApduError(SW.WRONG_LENGTH, "compound record size")
        assert self.pending is not None
        self.pending.capp_update = (record, apdu.data)
        return b"", SW.OK

    def _debit_for_purchase(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x01, 0x00)
        request = _decode(DebitForPurchaseRequest, apdu.data)
        pending = self.pending
        assert pending is not None and pending.transaction_type in (TYPE_PURCHASE, 0x09)
        keys = self.state.keys
        session_key = crypto.purchase_session_key(
            keys.algorithm, keys.dpk, pending.random, pending.ctc, request.terminal_seq
        )
        head = (
            pending.amount.to_bytes(4, "big")
            + bytes((pending.transaction_type,))
            + pending.terminal_id
        )
        when = request.date_bcd + request.time_bcd
        expected_mac1 = crypto.cbc_mac(keys.algorithm, session_key, head + when)
        context.power.step()
        if not hmac.compare_digest(expected_mac1, request.mac1):
            raise ApduError(SW.MAC_INVALID, "MAC1")
        mac2 = crypto.cbc_mac(keys.algorithm, session_key, pending.amount.to_bytes(4, "big"))
        tac = crypto.cbc_mac(
            keys.algorithm,
            crypto.tac_key(keys.algorithm, keys.dtk),
            head + request.terminal_seq.to_bytes(4, "big") + when,
        )
        record = LogRecord(
            pending.ctc,
            self.state.overdraft_limit,
            pending.amount,
            pending.transaction_type,
            pending.terminal_id,
            request.date_bcd,
            request.time_bcd,
        )
        transaction = Transaction(self.state, context.power)
        transaction.write("balance", pending.balance - pending.amount)
        transaction.write("offline_ctc", pending.ctc + 1)
        if pending.capp_update is not None:
            number, data = pending.capp_update
            records = list(self.state.capp_records)
            records[number - 1] = data
            transaction.write("capp_records", tuple(records))
        proof = Proof(pending.transaction_type, pending.ctc + 1, mac2, tac)
        self._write_log(transaction, record, proof)
        transaction.commit()
        return DebitForPurchaseResponse(tac, mac2).encode(), SW.OK

    def _write_log(self, transaction: Transaction, record: LogRecord, proof: Proof) -> None:
        state = self.state
        transaction.write("log", (record.encode(), *state.log)[:log_records_max])
        transaction.write("proofs", (proof, *state.proofs)[:proofs_max])

    def _get_transaction_prove(self, apdu: CommandApdu, context: CardContext) -> Response:
        if apdu.p1 != 0x00 or apdu.p2 not in (TYPE_LOAD, TYPE_PURCHASE, TYPE_CAPP_PURCHASE):
            raise ApduError(SW.WRONG_P1_P2)
        if len(apdu.data) != 2:
            raise ApduError(SW.WRONG_LENGTH)
        ctc_after = int.from_bytes(apdu.data, "big")
        for proof in self.state.proofs:
            if proof.transaction_type == apdu.p2 and proof.ctc_after == ctc_after:
                return TransactionProof(proof.mac2, proof.tac).encode(), SW.OK
        raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no such transaction")

    def _initialize_request(self, apdu: CommandApdu) -> InitializeRequest:
        request = _decode(InitializeRequest, apdu.data)
        if request.key_index != self.state.keys.key_index:
            raise ApduError(SW.KEY_INDEX_NOT_SUPPORTED)
        return request

    # --- PIN -----------------------------------------------------------------------------

    def _verify_pin(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x00, 0x00)
        if not pin_bytes_min <= len(apdu.data) <= pin_bytes_max:
            raise ApduError(SW.WRONG_LENGTH, "PIN is 2–6 BCD bytes")
        self._check_pin(apdu.data, context)
        self.pin_verified = True
        return b"", SW.OK

    def _change_pin(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x01, 0x00)
        old, separator, new = apdu.data.partition(b"\xff")
        for pin in (old, new):
            if not separator or not pin_bytes_min <= len(pin) <= pin_bytes_max:
                raise ApduError(SW.WRONG_DATA, "CHANGE PIN data is old PIN ‖ FF ‖ new PIN")
        self._check_pin(old, context)
        transaction = Transaction(self.state, context.power)
        transaction.write("pin", new)
        transaction.commit()
        self.pin_verified = True
        return b"", SW.OK

    def _check_pin(self, candidate: bytes, context: CardContext) -> None:
        """Count the try before comparing, so pulling the phone away mid-check cannot give a
        free guess; give it back on success."""
        state = self.state
        if state.pin_tries_left == 0:
            raise ApduError(SW.PIN_BLOCKED)
        counting = Transaction(state, context.power)
        counting.write("pin_tries_left", state.pin_tries_left - 1)
        counting.commit()
        if not hmac.compare_digest(candidate, state.pin):
            self.pin_verified = False
            raise ApduError(SW.pin_tries_left(state.pin_tries_left), "wrong PIN")
        restoring = Transaction(state, context.power)
        restoring.write("pin_tries_left", state.pin_tries_max)
        restoring.commit()

    # --- maintenance ---------------------------------------------------------------------

    def _get_challenge(self, apdu: CommandApdu, context: CardContext) -> Response:
        _expect_p1_p2(apdu, 0x00, 0x00)
        if apdu.le not in (4, 8):
            raise ApduError(SW.WRONG_LENGTH, "GET CHALLENGE gives 4 or 8 bytes")
        self.challenge = context.random(apdu.le)
        return self.challenge, SW.OK

    def _application_block(self, apdu: CommandApdu, context: CardContext) -> Response:
        self._check_maintenance_mac(apdu, APPLICATION_BLOCK_HEADER)
        return self._set_blocked(True, context)

    def _application_unblock(self, apdu: CommandApdu, context: CardContext) -> Response:
        self._check_maintenance_mac(apdu, APPLICATION_UNBLOCK_HEADER)
        return self._set_blocked(False, context)

    def _check_maintenance_mac(self, apdu: CommandApdu, header: bytes) -> None:
        challenge, self.challenge = self.challenge, None  # one challenge, one try
        if apdu.header != header[:4]:
            raise ApduError(SW.WRONG_P1_P2)
        if len(apdu.data) != 4:
            raise ApduError(SW.WRONG_LENGTH)
        if challenge is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "GET CHALLENGE first")
        keys = self.state.keys
        expected = maintenance_mac(keys.algorithm, keys.damk, challenge, header)
        if not hmac.compare_digest(expected, apdu.data):
            raise ApduError(SW.MAC_INVALID, "maintenance MAC")

    def _set_blocked(self, blocked: bool, context: CardContext) -> Response:
        transaction = Transaction(self.state, context.power)
        transaction.write("blocked", blocked)
        transaction.commit()
        return b"", SW.OK

    _handlers: ClassVar[dict[Command, Handler]] = {
        Command.GET_BALANCE: _get_balance,
        Command.READ_BINARY: _read_binary,
        Command.READ_RECORD: _read_record,
        Command.INITIALIZE_FOR_LOAD: _initialize_for_load,
        Command.CREDIT_FOR_LOAD: _credit_for_load,
        Command.INITIALIZE_FOR_PURCHASE: _initialize_for_purchase,
        Command.INITIALIZE_FOR_CAPP_PURCHASE: _initialize_for_purchase,
        Command.UPDATE_CAPP_DATA_CACHE: _update_capp_data_cache,
        Command.DEBIT_FOR_PURCHASE: _debit_for_purchase,
        Command.GET_TRANSACTION_PROVE: _get_transaction_prove,
        Command.VERIFY_PIN: _verify_pin,
        Command.CHANGE_PIN: _change_pin,
        Command.GET_CHALLENGE: _get_challenge,
        Command.APPLICATION_BLOCK: _application_block,
        Command.APPLICATION_UNBLOCK: _application_unblock,
    }


def maintenance_mac(algorithm: Algorithm, damk: bytes, challenge: bytes, header: bytes) -> bytes:
    """MAC of APPLICATION BLOCK / UNBLOCK (project-defined within card-application.md §2):
    CBC-MAC under the full 16-byte DAMK (3DES or SM4), ICV = challenge padded with zeros
    to a block, data = CLA INS P1 P2 Lc, ISO 9797-1 padding method 2, first 4 bytes."""
    icv = (challenge + bytes(algorithm.block_bytes))[: algorithm.block_bytes]
    return crypto.cbc_mac(algorithm, damk, header, icv)


def _tlv(tag: bytes, value: bytes) -> bytes:
    assert len(value) < 0x80, "short BER lengths only"
    return tag + bytes((len(value),)) + value


def _expect_p1_p2(apdu: CommandApdu, p1: int, p2: int) -> None:
    if (apdu.p1, apdu.p2) != (p1, p2):
        raise ApduError(SW.WRONG_P1_P2)


def _expect_no_data(apdu: CommandApdu) -> None:
    if apdu.data:
        raise ApduError(SW.WRONG_LENGTH, "no data expected")


def _decode(structure, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return structure.decode(data)
    except ValueError as error:
        raise ApduError(SW.WRONG_LENGTH, str(error)) from None


def _slice_for_le(content: bytes, offset: int, le: int | None) -> bytes:
    """READ answers: Le `00` (256) reads to the end; a larger Le than available is `6C xx`."""
    if offset > len(content):
        raise ApduError(SW.WRONG_P1_P2, "offset past the end of the file")
    available = content[offset:]
    if le is None or le == 256:
        return available
    if le > len(available):
        raise ApduError(SW.wrong_le(len(available)))
    return available[:le]
