"""ISO/IEC 7816-4 short APDUs and the status words the card answers.

Commands are parsed once at the card's door; a malformed command becomes a status word,
never an exception leaving the card.
"""

from __future__ import annotations

from dataclasses import dataclass


class SW:
    """Status words, card-application.md §2 (and ISO/IEC 7816-4 §5.6 where noted)."""

    OK = 0x9000
    SELECTED_APPLICATION_BLOCKED = 0x6283
    WRONG_LENGTH = 0x6700
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    PIN_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80  # ISO 7816-4: malformed data field (e.g. CHANGE PIN without FF)
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83  # ISO 7816-4: READ RECORD past the records written
    WRONG_P1_P2 = 0x6A86
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MAC_INVALID = 0x9302
    INSUFFICIENT_FUNDS = 0x9401
    KEY_INDEX_NOT_SUPPORTED = 0x9403
    AMOUNT_OR_BALANCE_LIMIT = 0x9406

    @staticmethod
    def pin_tries_left(tries: int) -> int:
        """`63 Cx`: wrong PIN, x tries left."""
        assert 0 <= tries <= 0xF
        return 0x63C0 | tries

    @staticmethod
    def wrong_le(available: int) -> int:
        """`6C xx`: Le wrong, xx bytes available (ISO 7816-4)."""
        return 0x6C00 | (available & 0xFF)


class ApduError(Exception):
    """Raised inside the card to answer a status word; caught at the card's door."""

    def __init__(self, sw: int, reason: str = "") -> None:
        super().__init__(f"{sw:04X} {reason}".strip())
        self.sw = sw


short_data_bytes_max = 255
short_le_max = 256


@dataclass(frozen=True, slots=True)
class CommandApdu:
    """A short C-APDU (ISO 7816-4 §5.1, cases 1–4). ``le`` is None when absent, 256 for `00`."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def encode(self) -> bytes:
        assert len(self.data) <= short_data_bytes_max
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            assert 1 <= self.le <= short_le_max
            out += bytes((self.le & 0xFF,))
        return out

    @property
    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))


def parse_command(raw: bytes) -> CommandApdu:
    """Decode a short C-APDU; raises ApduError(67 00) when the length bytes do not add up."""
    if len(raw) < 4:
        raise ApduError(SW.WRONG_LENGTH, "shorter than a header")
    cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
    body = raw[4:]
    if not body:  # case 1
        return CommandApdu(cla, ins, p1, p2)
    if len(body) == 1:  # case 2: Le only
        return CommandApdu(cla, ins, p1, p2, b"", body[0] or short_le_max)
    lc = body[0]
    if lc == 0:
        raise ApduError(SW.WRONG_LENGTH, "extended length not supported")
    if len(body) == 1 + lc:  # case 3
        return CommandApdu(cla, ins, p1, p2, bytes(body[1:]))
    if len(body) == 2 + lc:  # case 4
        return CommandApdu(cla, ins, p1, p2, bytes(body[1 : 1 + lc]), body[-1] or short_le_max)
    raise ApduError(SW.WRONG_LENGTH, "Lc does not match the data")


def response(data: bytes, sw: int = SW.OK) -> bytes:
    """R-APDU: response data followed by SW1 SW2."""
    return data + sw.to_bytes(2, "big")


def split_response(raw: bytes) -> tuple[bytes, int]:
    """R-APDU → (data, SW). Raises ValueError on fewer than two bytes."""
    if len(raw) < 2:
        raise ValueError(f"response too short: {raw.hex()}")
    return raw[:-2], int.from_bytes(raw[-2:], "big")
