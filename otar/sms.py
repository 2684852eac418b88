"""SMS-PP download: the command packet inside an SMS-DELIVER TPDU (3GPP TS 23.040 §9.2.2.1)
with user data header IEI 70 (TS 31.115 §4), inside the ENVELOPE the phone sends the SIM
(3GPP TS 31.111 §7.1.1.2, BER-TLV tag D1)."""

from __future__ import annotations

from dataclasses import dataclass

from otar.packets import sms_user_data_bytes_max

COMMAND_UDH = bytes.fromhex("027000")  # UDHL 02, IEI 70 command packet, length 00
RESPONSE_UDH = bytes.fromhex("027100")  # IEI 71: a response packet (PoR), TS 31.115 §4
TP_PID_SIM_DATA_DOWNLOAD = 0x7F
TP_DCS_8BIT_CLASS_2 = 0xF6
ENVELOPE_SMS_PP = 0xD1
TAG_DEVICE_IDENTITIES, TAG_ADDRESS, TAG_SMS_TPDU = 0x82, 0x86, 0x8B
DEVICES_NETWORK_TO_UICC = bytes((0x83, 0x81))


def _address(digits: str) -> tuple[bytes, int]:
    """BCD semi-octets, F-padded; TON international/ISDN (0x91) or unknown (0x81)."""
    if not digits.lstrip("+").isdigit():
        raise ValueError(f"not an address: {digits!r}")
    ton_npi = 0x91 if digits.startswith("+") else 0x81
    digits = digits.lstrip("+")
    padded = digits + ("F" if len(digits) % 2 else "")
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return bytes((ton_npi,)) + bytes.fromhex(swapped), len(digits)


def _digits(raw: bytes) -> str:
    text = "".join(f"{b & 0xF:X}{b >> 4:X}" for b in raw)
    return text.rstrip("F")


def encode_sms_deliver(originator: str, packet: bytes, timestamp: bytes = bytes(7)) -> bytes:
    address, digit_count = _address(originator)
    user_data = COMMAND_UDH + packet
    if len(user_data) > sms_user_data_bytes_max:
        raise ValueError(
            f"a command packet does not fit one SMS: {len(packet)} bytes, {len(user_data)} "
            f"with its header 02 70 00; one SMS carries {sms_user_data_bytes_max}"
        )
    return (
        bytes((0x40, digit_count))
        + address
        + bytes((TP_PID_SIM_DATA_DOWNLOAD, TP_DCS_8BIT_CLASS_2))
        + timestamp
        + bytes((len(user_data),))
        + user_data
    )


@dataclass(frozen=True)
class SmsDeliver:
    originator: str
    user_data_header: bytes
    user_data: bytes


def decode_sms_deliver(tpdu: bytes) -> SmsDeliver:
    try:
        first, digit_count = tpdu[0], tpdu[1]
        offset = 2 + 1 + (digit_count + 1) // 2
        originator = _digits(tpdu[3:offset])
        offset += 2 + 7  # PID, DCS, SCTS
        length = tpdu[offset]
        user_data = tpdu[offset + 1 : offset + 1 + length]
        if len(user_data) != length or first & 0x03 != 0:
            raise ValueError("not a whole SMS-DELIVER")
        if first & 0x40:  # UDHI: a header precedes the data
            header_length = user_data[0]
            return SmsDeliver(
                originator, user_data[: 1 + header_length], user_data[1 + header_length :]
            )
        return SmsDeliver(originator, b"", user_data)
    except IndexError:
        raise ValueError("a truncated SMS-DELIVER") from None


TP_DCS_8BIT = 0x04


def encode_sms_submit(destination: str, user_data: bytes, reference: int = 0) -> bytes:
    """SMS-SUBMIT (TS 23.040 §9.2.2.2), 8-bit data, no validity period, no header — what
    the SIM's SEND SHORT MESSAGE hands the phone."""
    address, digit_count = _address(destination)
    if len(user_data) > sms_user_data_bytes_max:
        raise ValueError("more than one SMS of user data")
    return (
        bytes((0x01, reference & 0xFF, digit_count))
        + address
        + bytes((0x00, TP_DCS_8BIT, len(user_data)))
        + user_data
    )


@dataclass(frozen=True)
class SmsSubmit:
    destination: str
    user_data: bytes


def decode_sms_submit(tpdu: bytes) -> SmsSubmit:
    try:
        first, digit_count = tpdu[0], tpdu[2]
        if first & 0x03 != 0x01 or first & 0x18:
            raise ValueError("not an SMS-SUBMIT without validity period")
        offset = 3 + 1 + (digit_count + 1) // 2
        ton = tpdu[3]
        destination = ("+" if ton == 0x91 else "") + _digits(tpdu[4:offset])
        offset += 2  # PID, DCS
        length = tpdu[offset]
        user_data = tpdu[offset + 1 : offset + 1 + length]
    except IndexError:
        raise ValueError("a truncated SMS-SUBMIT") from None
    if len(user_data) != length or first & 0x40:
        raise ValueError("SMS-SUBMIT user data is whole and has no header here")
    return SmsSubmit(destination, user_data)


tlv_value_bytes_max = 255  # one-byte lengths, `81 xx` from 128: all an ENVELOPE needs


def tlv(tag: int, value: bytes) -> bytes:
    """One BER-TLV with a one-byte tag (TS 102 223 §8, ENVELOPE and proactive data)."""
    if len(value) > tlv_value_bytes_max:
        raise ValueError(f"a TLV value is at most {tlv_value_bytes_max} bytes here")
    if len(value) < 0x80:
        return bytes((tag, len(value))) + value
    return bytes((tag, 0x81, len(value))) + value


def encode_envelope(tpdu: bytes, smsc_address: str = "+8613800100500") -> bytes:
    """The ENVELOPE (SMS-PP download) C-APDU: ``80 C2 00 00 Lc D1 …``."""
    address, _ = _address(smsc_address)
    body = (
        tlv(TAG_DEVICE_IDENTITIES, DEVICES_NETWORK_TO_UICC)
        + tlv(TAG_ADDRESS, address)
        + tlv(TAG_SMS_TPDU, tpdu)
    )
    data = tlv(ENVELOPE_SMS_PP, body)
    if len(data) > 255:
        raise ValueError("an ENVELOPE is at most 255 bytes")
    return bytes((0x80, 0xC2, 0x00, 0x00, len(data))) + data


def sms_tpdu_of_envelope(data: bytes) -> bytes:
    """The SMS TPDU inside ENVELOPE data (tag D1); ValueError when it is not SMS-PP."""
    if not data or data[0] != ENVELOPE_SMS_PP:
        raise ValueError("not an SMS-PP download")
    body, _ = read_tlv(data, 0)
    offset = 0
    while offset < len(body):
        value, next_offset = read_tlv(body, offset)
        if body[offset] & 0x7F == TAG_SMS_TPDU & 0x7F:
            return value
        offset = next_offset
    raise ValueError("no SMS TPDU in the ENVELOPE")


def read_tlv(data: bytes, offset: int) -> tuple[bytes, int]:
    """The value of the TLV at ``offset``, and where the next one starts."""
    if offset + 2 > len(data):
        raise ValueError("a truncated TLV")
    length, start = data[offset + 1], offset + 2
    if length == 0x81:
        if offset + 3 > len(data):
            raise ValueError("a truncated TLV")
        length, start = data[offset + 2], offset + 3
    elif length > 0x80:
        raise ValueError("TLV lengths over 255 are not used here")
    if start + length > len(data):
        raise ValueError("a TLV longer than its data")
    return data[start : start + length], start + length
