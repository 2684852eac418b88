"""Byte structures of the transit e-purse, declared once (card-application.md §1–§2).

Card and readers both use these: the card to build its answers, readers and the platform
to build commands and read answers. ``decode(encode(x)) == x`` for each; decoders raise
``ValueError`` on a wrong length.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sim_applet.apdu import CommandApdu
from sim_applet.crypto import Algorithm

TRANSIT_AID = bytes.fromhex("A000000632010105")  # card-application.md §1 (JT/T 978)
TRANSIT_FID = 0x1001
MF_FID = 0x3F00

# Transaction types, card-application.md §1
TYPE_LOAD = 0x02
TYPE_PURCHASE = 0x06
TYPE_CAPP_PURCHASE = 0x09

# Short file identifiers, card-application.md §1
SFI_PUBLIC = 0x15
SFI_HOLDER = 0x16
SFI_LOG = 0x18
SFI_CAPP = 0x1A

log_records_max = 10
log_record_bytes = 23
public_data_bytes = 30
amount_fen_max = 0xFFFFFFFF


def _expect_length(data: bytes, length: int, what: str) -> None:
    if len(data) != length:
        raise ValueError(f"{what}: {len(data)} bytes, expected {length}")


def bcd_encode(digits: str) -> bytes:
    if len(digits) % 2 or not digits.isdigit():
        raise ValueError(f"not an even count of decimal digits: {digits!r}")
    return bytes.fromhex(digits)


def bcd_decode(data: bytes) -> str:
    text = data.hex()
    if not text.isdigit():
        raise ValueError(f"not BCD: {text}")
    return text


def bcd_date(value: date) -> bytes:
    """YYYYMMDD BCD (4 bytes)."""
    return bcd_encode(value.strftime("%Y%m%d"))


def bcd_time(value: datetime) -> bytes:
    """hhmmss BCD (3 bytes)."""
    return bcd_encode(value.strftime("%H%M%S"))


def parse_bcd_date(date_bcd: bytes) -> date:
    """YYYYMMDD BCD → date; ValueError when not BCD or not a calendar date."""
    digits = bcd_decode(date_bcd)
    if len(digits) != 8:
        raise ValueError(f"a BCD date is 4 bytes: {digits}")
    return date(int(digits[0:4]), int(digits[4:6]), int(digits[6:8]))


def parse_bcd_datetime(date_bcd: bytes, time_bcd: bytes) -> datetime:
    day = parse_bcd_date(date_bcd)
    digits = bcd_decode(time_bcd)
    if len(digits) != 6:
        raise ValueError(f"a BCD time is 3 bytes: {digits}")
    return datetime(
        day.year, day.month, day.day, int(digits[0:2]), int(digits[2:4]), int(digits[4:6])
    )


@dataclass(frozen=True, slots=True)
class PublicData:
    """SFI 0x15, 30 bytes: issuer id (8) · app type (1) · app version (1) · application
    serial number (10) · start date (4, BCD) · expiry date (4, BCD) · reserved (2)."""

    issuer_id: bytes
    app_type: int
    app_version: int
    serial: bytes
    start_date: date
    expiry_date: date
    reserved: bytes = b"\x00\x00"

    def encode(self) -> bytes:
        assert len(self.issuer_id) == 8 and len(self.serial) == 10 and len(self.reserved) == 2
        return (
            self.issuer_id
            + bytes((self.app_type, self.app_version))
            + self.serial
            + bcd_date(self.start_date)
            + bcd_date(self.expiry_date)
            + self.reserved
        )

    @classmethod
    def decode(cls, data: bytes) -> PublicData:
        _expect_length(data, public_data_bytes, "public application data")
        return cls(
            issuer_id=data[0:8],
            app_type=data[8],
            app_version=data[9],
            serial=data[10:20],
            start_date=parse_bcd_date(data[20:24]),
            expiry_date=parse_bcd_date(data[24:28]),
            reserved=data[28:30],
        )


@dataclass(frozen=True, slots=True)
class LogRecord:
    """SFI 0x18 record, 23 bytes: CTC (2) · overdraft limit (3) · amount (4) · type (1) ·
    terminal id (6) · date (4, BCD) · time (3, BCD). CTC = the value INITIALIZE returned."""

    ctc: int
    overdraft_limit: int
    amount: int
    transaction_type: int
    terminal_id: bytes
    date_bcd: bytes
    time_bcd: bytes

    def encode(self) -> bytes:
        return (
            self.ctc.to_bytes(2, "big")
            + self.overdraft_limit.to_bytes(3, "big")
            + self.amount.to_bytes(4, "big")
            + bytes((self.transaction_type,))
            + self.terminal_id
            + self.date_bcd
            + self.time_bcd
        )

    @classmethod
    def decode(cls, data: bytes) -> LogRecord:
        _expect_length(data, log_record_bytes, "transaction log record")
        return cls(
            ctc=int.from_bytes(data[0:2], "big"),
            overdraft_limit=int.from_bytes(data[2:5], "big"),
            amount=int.from_bytes(data[5:9], "big"),
            transaction_type=data[9],
            terminal_id=data[10:16],
            date_bcd=data[16:20],
            time_bcd=data[20:23],
        )

    @property
    def when(self) -> datetime:
        return parse_bcd_datetime(self.date_bcd, self.time_bcd)


# --- INITIALIZE FOR LOAD / CREDIT FOR LOAD (card-application.md §2) ---------------------


@dataclass(frozen=True, slots=True)
class InitializeRequest:
    """Data of INITIALIZE FOR LOAD / PURCHASE / CAPP PURCHASE: key index (1) · amount (4) ·
    terminal id (6)."""

    key_index: int
    amount: int
    terminal_id: bytes

    def encode(self) -> bytes:
        return bytes((self.key_index,)) + self.amount.to_bytes(4, "big") + self.terminal_id

    @classmethod
    def decode(cls, data: bytes) -> InitializeRequest:
        _expect_length(data, 11, "INITIALIZE data")
        return cls(data[0], int.from_bytes(data[1:5], "big"), data[5:11])


def initialize_for_load(request: InitializeRequest) -> CommandApdu:
    return CommandApdu(0x80, 0x50, 0x00, 0x02, request.encode(), 0x10)


def initialize_for_purchase(request: InitializeRequest, capp: bool = False) -> CommandApdu:
    return CommandApdu(0x80, 0x50, 0x03 if capp else 0x01, 0x02, request.encode(), 0x0F)


@dataclass(frozen=True, slots=True)
class InitializeForLoadResponse:
    """old balance (4) · online CTC (2) · key version (1) · algorithm id (1) ·
    pseudo-random (4) · MAC1 (4)."""

    old_balance: int
    online_ctc: int
    key_version: int
    algorithm: Algorithm
    random: bytes
    mac1: bytes

    def encode(self) -> bytes:
        return (
            self.old_balance.to_bytes(4, "big")
            + self.online_ctc.to_bytes(2, "big")
            + bytes((self.key_version, self.algorithm))
            + self.random
            + self.mac1
        )

    @classmethod
    def decode(cls, data: bytes) -> InitializeForLoadResponse:
        _expect_length(data, 16, "INITIALIZE FOR LOAD response")
        return cls(
            old_balance=int.from_bytes(data[0:4], "big"),
            online_ctc=int.from_bytes(data[4:6], "big"),
            key_version=data[6],
            algorithm=Algorithm(data[7]),
            random=data[8:12],
            mac1=data[12:16],
        )


@dataclass(frozen=True, slots=True)
class CreditForLoadRequest:
    """date (4) · time (3) · MAC2 (4)."""

    date_bcd: bytes
    time_bcd: bytes
    mac2: bytes

    def encode(self) -> bytes:
        return self.date_bcd + self.time_bcd + self.mac2

    @classmethod
    def decode(cls, data: bytes) -> CreditForLoadRequest:
        _expect_length(data, 11, "CREDIT FOR LOAD data")
        return cls(data[0:4], data[4:7], data[7:11])

    def command(self) -> CommandApdu:
        return CommandApdu(0x80, 0x52, 0x00, 0x00, self.encode(), 0x04)


# --- INITIALIZE FOR PURCHASE / DEBIT FOR PURCHASE ----------------------------------------


@dataclass(frozen=True, slots=True)
class InitializeForPurchaseResponse:
    """balance (4) · offline CTC (2) · overdraft limit (3) · key version (1) ·
    algorithm id (1) · pseudo-random (4)."""

    balance: int
    offline_ctc: int
    overdraft_limit: int
    key_version: int
    algorithm: Algorithm
    random: bytes

    def encode(self) -> bytes:
        return (
            self.balance.to_bytes(4, "big")
            + self.offline_ctc.to_bytes(2, "big")
            + self.overdraft_limit.to_bytes(3, "big")
            + bytes((self.key_version, self.algorithm))
            + self.random
        )

    @classmethod
    def decode(cls, data: bytes) -> InitializeForPurchaseResponse:
        _expect_length(data, 15, "INITIALIZE FOR PURCHASE response")
        return cls(
            balance=int.from_bytes(data[0:4], "big"),
            offline_ctc=int.from_bytes(data[4:6], "big"),
            overdraft_limit=int.from_bytes(data[6:9], "big"),
            key_version=data[9],
            algorithm=Algorithm(data[10]),
            random=data[11:15],
        )


@dataclass(frozen=True, slots=True)
class DebitForPurchaseRequest:
    """terminal transaction seq (4) · date (4) · time (3) · MAC1 (4)."""

    terminal_seq: int
    date_bcd: bytes
    time_bcd: bytes
    mac1: bytes

    def encode(self) -> bytes:
        return self.terminal_seq.to_bytes(4, "big") + self.date_bcd + self.time_bcd + self.mac1

    @classmethod
    def decode(cls, data: bytes) -> DebitForPurchaseRequest:
        _expect_length(data, 15, "DEBIT FOR PURCHASE data")
        return cls(int.from_bytes(data[0:4], "big"), data[4:8], data[8:11], data[11:15])

    def command(self) -> CommandApdu:
        return CommandApdu(0x80, 0x54, 0x01, 0x00, self.encode(), 0x08)


@dataclass(frozen=True, slots=True)
class DebitForPurchaseResponse:
    """TAC (4) · MAC2 (4)."""

    tac: bytes
    mac2: bytes

    def encode(self) -> bytes:
        return self.tac + self.mac2

    @classmethod
    def decode(cls, data: bytes) -> DebitForPurchaseResponse:
        _expect_length(data, 8, "DEBIT FOR PURCHASE response")
        return cls(data[0:4], data[4:8])


@dataclass(frozen=True, slots=True)
class TransactionProof:
    """GET TRANSACTION PROVE response: MAC2 (4) · TAC (4)."""

    mac2: bytes
    tac: bytes

    def encode(self) -> bytes:
        return self.mac2 + self.tac

    @classmethod
    def decode(cls, data: bytes) -> TransactionProof:
        _expect_length(data, 8, "GET TRANSACTION PROVE response")
        return cls(data[0:4], data[4:8])


def get_transaction_prove(transaction_type: int, ctc_after: int) -> CommandApdu:
    """`80 5A 00 type 02 CTC 08`; CTC = INITIALIZE's value plus one (card-application.md §2)."""
    return CommandApdu(0x80, 0x5A, 0x00, transaction_type, ctc_after.to_bytes(2, "big"), 0x08)


def select_by_aid(aid: bytes) -> CommandApdu:
    return CommandApdu(0x00, 0xA4, 0x04, 0x00, aid, 256)


def read_binary(sfi: int, offset: int = 0, le: int = 256) -> CommandApdu:
    return CommandApdu(0x00, 0xB0, 0x80 | sfi, offset, b"", le)


def read_record(sfi: int, record: int, le: int = 256) -> CommandApdu:
    return CommandApdu(0x00, 0xB2, record, (sfi << 3) | 4, b"", le)


GET_BALANCE = CommandApdu(0x80, 0x5C, 0x00, 0x02, b"", 0x04)
GET_CHALLENGE = CommandApdu(0x00, 0x84, 0x00, 0x00, b"", 0x04)
APPLICATION_BLOCK_HEADER = bytes.fromhex("841E000004")  # CLA INS P1 P2 Lc, as MACed
APPLICATION_UNBLOCK_HEADER = bytes.fromhex("8418000004")


def verify_pin(pin: bytes) -> CommandApdu:
    return CommandApdu(0x00, 0x20, 0x00, 0x00, pin)


def change_pin(old_pin: bytes, new_pin: bytes) -> CommandApdu:
    """CHANGE PIN: old PIN ‖ FF ‖ new PIN, both BCD (card-application.md)."""
    return CommandApdu(0x80, 0x5E, 0x01, 0x00, old_pin + b"\xff" + new_pin)
