"""SIM Toolkit, the subset a menu application needs (ETSI TS 102 223), sans I/O: BER-TLV,
the proactive commands SET UP MENU, SELECT ITEM, DISPLAY TEXT, GET INPUT and SEND SHORT
MESSAGE, TERMINAL RESPONSE, and the MENU SELECTION envelope. Both sides use it: the SIM
builds proactive commands and reads terminal responses; the phone the reverse.

Encodings (TS 102 223 §8 and §9, tags with the comprehension-required bit as the spec
lists them): proactive command `D0`; command details `81` (number, type, qualifier);
device identities `82` (source, destination: keypad 01, display 02, UICC 81, terminal 82,
network 83); result `83`; alpha identifier `85`; address `86`; SMS TPDU `8B`; text string
`8D` (DCS ‖ text); item `8F` (id ‖ text); response length `91` (min, max); item
identifier `90`; menu selection envelope `D3`. Texts: the SMS default alphabet unpacked
(DCS 04) when every character has the same code there as in ASCII, otherwise UCS2
(DCS 08; alpha identifiers: `80` ‖ UCS2, TS 102 221 annex A).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from otar.sms import read_tlv
from otar.sms import tlv as ber_tlv

TAG_PROACTIVE = 0xD0
TAG_MENU_SELECTION = 0xD3
TAG_COMMAND_DETAILS = 0x81
TAG_DEVICE_IDENTITIES = 0x82
TAG_RESULT = 0x83
TAG_ALPHA = 0x85
TAG_ADDRESS = 0x86
TAG_SMS_TPDU = 0x8B
TAG_TEXT = 0x8D
TAG_ITEM = 0x8F
TAG_ITEM_ID = 0x90
TAG_RESPONSE_LENGTH = 0x91

DEVICE_KEYPAD, DEVICE_DISPLAY, DEVICE_UICC, DEVICE_TERMINAL, DEVICE_NETWORK = (
    0x01,
    0x02,
    0x81,
    0x82,
    0x83,
)
DCS_8BIT, DCS_UCS2 = 0x04, 0x08

# GET INPUT qualifier bits (TS 102 223 §8.6): bit 1 alphabet (0 digits only), bit 2 UCS2,
# bit 3 user input not revealed.
INPUT_ALPHABET, INPUT_UCS2, INPUT_HIDDEN = 0x01, 0x02, 0x04
DISPLAY_WAIT_FOR_USER = 0x80  # DISPLAY TEXT qualifier bit 8


class CommandType(IntEnum):
    SEND_SHORT_MESSAGE = 0x13
    DISPLAY_TEXT = 0x21
    GET_INPUT = 0x23
    SELECT_ITEM = 0x24
    SET_UP_MENU = 0x25


class Result(IntEnum):
    OK = 0x00
    TERMINATED_BY_USER = 0x10
    BACKWARD_MOVE = 0x11
    NO_RESPONSE_FROM_USER = 0x12
    TERMINAL_UNABLE = 0x20
    NETWORK_UNABLE = 0x21


class StkError(ValueError):
    pass


# --- BER-TLV (otar.sms's: one encoding for the ENVELOPEs and the proactive commands) ------


def tlv(tag: int, value: bytes) -> bytes:
    try:
        return ber_tlv(tag, value)
    except ValueError as error:
        raise StkError(str(error)) from None


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Simple TLVs in order; the comprehension-required bit is dropped from the tag."""
    items, offset = [], 0
    while offset < len(data):
        value, next_offset = _read(data, offset)
        items.append((data[offset] & 0x7F | 0x80, value))
        offset = next_offset
    return items


def unwrap(data: bytes, tag: int) -> list[tuple[int, bytes]]:
    """The simple TLVs inside a BER-TLV template (`D0`, `D3`)."""
    if not data:
        raise StkError("empty template")
    body, end = _read(data, 0)
    if end != len(data):
        raise StkError("template length does not match")
    if data[0] != tag:
        raise StkError(f"expected template {tag:02X}, got {data[0]:02X}")
    return parse_tlvs(body)


def _read(data: bytes, offset: int) -> tuple[bytes, int]:
    try:
        return read_tlv(data, offset)
    except ValueError as error:
        raise StkError(str(error)) from None


# --- texts ---------------------------------------------------------------------------------

_SAME_AS_ASCII = set(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 !\"#%&'()*+,-./:;<=>?\n"
)


def _is_default_alphabet(text: str) -> bool:
    return all(character in _SAME_AS_ASCII for character in text)


def encode_text(text: str) -> bytes:
    """A text string value: DCS ‖ text."""
    if _is_default_alphabet(text):
        return bytes((DCS_8BIT,)) + text.encode("ascii")
    return bytes((DCS_UCS2,)) + text.encode("utf-16-be")


def decode_text(value: bytes) -> str:
    if not value:
        return ""
    dcs, body = value[0], value[1:]
    if dcs == DCS_8BIT:
        return body.decode("ascii", errors="replace")
    if dcs == DCS_UCS2:
        if len(body) % 2:
            raise StkError("UCS2 text of odd length")
        return body.decode("utf-16-be", errors="replace")
    raise StkError(f"text coding {dcs:02X} not supported")


def encode_alpha(text: str) -> bytes:
    if _is_default_alphabet(text):
        return text.encode("ascii")
    return b"\x80" + text.encode("utf-16-be")


def decode_alpha(value: bytes) -> str:
    if value[:1] == b"\x80":
        if len(value) % 2 != 1:
            raise StkError("UCS2 alpha identifier of odd length")
        return value[1:].decode("utf-16-be", errors="replace")
    return value.rstrip(b"\xff").decode("ascii", errors="replace")


# --- proactive commands ----------------------------------------------------------------------


# Device identities' destination per command (TS 102 384 test sequences use these).
_DESTINATIONS = {
    CommandType.DISPLAY_TEXT: DEVICE_DISPLAY,
    CommandType.SEND_SHORT_MESSAGE: DEVICE_NETWORK,
    CommandType.GET_INPUT: DEVICE_TERMINAL,
    CommandType.SELECT_ITEM: DEVICE_TERMINAL,
    CommandType.SET_UP_MENU: DEVICE_TERMINAL,
}


@dataclass(frozen=True)
class ProactiveCommand:
    """One proactive command, decoded enough for a phone to act on it."""

    number: int
    type: CommandType
    qualifier: int = 0
    alpha: str | None = None
    text: str | None = None
    items: tuple[tuple[int, str], ...] = ()
    response_length: tuple[int, int] | None = None
    address: bytes | None = None  # TON/NPI ‖ BCD digits
    tpdu: bytes | None = None
    destination: int | None = None  # default: the device the command is for, as below

    def encode(self) -> bytes:
        destination = self.destination or _DESTINATIONS[self.type]
        body = tlv(TAG_COMMAND_DETAILS, bytes((self.number, self.type, self.qualifier)))
        body += tlv(TAG_DEVICE_IDENTITIES, bytes((DEVICE_UICC, destination)))
        if self.alpha is not None:
            body += tlv(TAG_ALPHA, encode_alpha(self.alpha))
        if self.address is not None:
            body += tlv(TAG_ADDRESS, self.address)
        if self.tpdu is not None:
            body += tlv(TAG_SMS_TPDU, self.tpdu)
        if self.text is not None:
            body += tlv(TAG_TEXT, encode_text(self.text))
        if self.response_length is not None:
            body += tlv(TAG_RESPONSE_LENGTH, bytes(self.response_length))
        for item_id, text in self.items:
            body += tlv(TAG_ITEM, bytes((item_id,)) + encode_alpha(text))
        return tlv(TAG_PROACTIVE, body)

    @classmethod
    def decode(cls, data: bytes) -> ProactiveCommand:
        fields_: dict[str, object] = {}
        items: list[tuple[int, str]] = []
        details = None
        for tag, value in unwrap(data, TAG_PROACTIVE):
            if tag == TAG_COMMAND_DETAILS and len(value) == 3:
                details = value
            elif tag == TAG_DEVICE_IDENTITIES and len(value) == 2:
                fields_["destination"] = value[1]
            elif tag == TAG_ALPHA:
                fields_["alpha"] = decode_alpha(value)
            elif tag == TAG_TEXT:
                fields_["text"] = decode_text(value)
            elif tag == TAG_ITEM and value:
                items.append((value[0], decode_alpha(value[1:])))
            elif tag == TAG_RESPONSE_LENGTH and len(value) == 2:
                fields_["response_length"] = (value[0], value[1])
            elif tag == TAG_ADDRESS:
                fields_["address"] = value
            elif tag == TAG_SMS_TPDU:
                fields_["tpdu"] = value
        if details is None:
            raise StkError("a proactive command needs its command details")
        try:
            kind = CommandType(details[1])
        except ValueError:
            raise StkError(f"proactive command type {details[1]:02X} not supported") from None
        return cls(details[0], kind, details[2], items=tuple(items), **fields_)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TerminalResponse:
    number: int
    type: CommandType
    qualifier: int
    result: Result = Result.OK
    text: str | None = None  # GET INPUT
    item_id: int | None = None  # SELECT ITEM
    extra: bytes = field(default=b"")

    def encode(self) -> bytes:
        body = tlv(TAG_COMMAND_DETAILS, bytes((self.number, self.type, self.qualifier)))
        body += tlv(TAG_DEVICE_IDENTITIES, bytes((DEVICE_TERMINAL, DEVICE_UICC)))
        body += tlv(TAG_RESULT, bytes((self.result,)) + self.extra)
        if self.text is not None:
            body += tlv(TAG_TEXT, encode_text(self.text))
        if self.item_id is not None:
            body += tlv(TAG_ITEM_ID, bytes((self.item_id,)))
        return body  # TERMINAL RESPONSE data is the simple TLVs, no template

    @classmethod
    def for_command(cls, command: ProactiveCommand, **kwargs: object) -> TerminalResponse:
        return cls(command.number, command.type, command.qualifier, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def decode(cls, data: bytes) -> TerminalResponse:
        values = dict(parse_tlvs(data))
        details, result = values.get(TAG_COMMAND_DETAILS), values.get(TAG_RESULT)
        if details is None or len(details) != 3 or not result:
            raise StkError("a terminal response needs command details and a result")
        try:
            kind, general = CommandType(details[1]), Result(result[0])
        except ValueError:
            raise StkError("unknown command type or result") from None
        text = values.get(TAG_TEXT)
        item = values.get(TAG_ITEM_ID)
        return cls(
            details[0],
            kind,
            details[2],
            general,
            None if text is None else decode_text(text),
            item[0] if item else None,
            result[1:],
        )


def menu_selection(item_id: int) -> bytes:
    """ENVELOPE (MENU SELECTION) data: the keypad chose ``item_id`` (TS 102 223 §7.2)."""
    return tlv(
        TAG_MENU_SELECTION,
        tlv(TAG_DEVICE_IDENTITIES, bytes((DEVICE_KEYPAD, DEVICE_UICC)))
        + tlv(TAG_ITEM_ID, bytes((item_id,))),
    )


def parse_menu_selection(data: bytes) -> int:
    values = dict(unwrap(data, TAG_MENU_SELECTION))
    item = values.get(TAG_ITEM_ID)
    if not item or len(item) != 1:
        raise StkError("a menu selection names one item")
    return item[0]
