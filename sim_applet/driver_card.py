"""The driver card application: drivers sign in on the bus POS by tapping it.

Project-defined (the seed names driver cards, no standard defines them):
- AID `F0 42 55 53 44 52 56 01` (`F0`: proprietary, ISO/IEC 7816-5; then "BUSDRV", 01).
- SFI 0x15, 64 bytes, free read: card serial (10) · driver id (10, ASCII, space padded) ·
  operator id (8, ASCII) · fleet id (8, ASCII) · name (24, UTF-8, zero padded) ·
  expiry date (4, BCD YYYYMMDD).
- INTERNAL AUTHENTICATE `00 88 00 00 08` challenge (8) `08` → `3DES_K(challenge)`, K the
  card key diversified from the operator's driver-card master key by the card serial, so a
  copied file cannot sign a driver in: the POS's PSAM checks the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sim_applet import crypto
from sim_applet.apdu import SW, ApduError, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.purse import CardContext, Response, _slice_for_le, _tlv
from sim_applet.structures import SFI_PUBLIC, bcd_date, parse_bcd_date

DRIVER_AID = bytes.fromhex("F042555344525601")
driver_data_bytes = 64
challenge_bytes = 8


def _text(value: str, size: int, pad: bytes) -> bytes:
    raw = value.encode()
    if len(raw) > size:
        raise ValueError(f"{value!r} is longer than {size} bytes")
    return raw + pad * (size - len(raw))


@dataclass(frozen=True)
class DriverData:
    serial: bytes
    driver_id: str
    operator_id: str
    fleet_id: str
    name: str
    expiry_date: date

    def encode(self) -> bytes:
        assert len(self.serial) == 10
        return (
            self.serial
            + _text(self.driver_id, 10, b" ")
            + _text(self.operator_id, 8, b" ")
            + _text(self.fleet_id, 8, b" ")
            + _text(self.name, 24, b"\x00")
            + bcd_date(self.expiry_date)
        )

    @classmethod
    def decode(cls, data: bytes) -> DriverData:
        if len(data) != driver_data_bytes:
            raise ValueError(f"driver data: {len(data)} bytes, expected {driver_data_bytes}")
        return cls(
            serial=data[0:10],
            driver_id=data[10:20].decode().rstrip(" "),
            operator_id=data[20:28].decode().rstrip(" "),
            fleet_id=data[28:36].decode().rstrip(" "),
            name=data[36:60].rstrip(b"\x00").decode(),
            expiry_date=parse_bcd_date(data[60:64]),
        )


@dataclass
class DriverCardState:
    data: bytes
    auth_key: bytes  # diversified from the operator's driver-card master key


def internal_authenticate(challenge: bytes) -> CommandApdu:
    return CommandApdu(0x00, 0x88, 0x00, 0x00, challenge, challenge_bytes)


def driver_cryptogram(auth_key: bytes, challenge: bytes) -> bytes:
    return crypto.encrypt_block(Algorithm.TDES, auth_key, challenge)


class DriverCard:
    aid = DRIVER_AID
    fid = None
    kind = "driver_card"

    def __init__(self, state: DriverCardState) -> None:
        self.state = state

    def reset(self) -> None:
        """Nothing volatile to forget."""

    def cancel_transaction(self) -> None:
        """A driver card has no transactions."""

    def select(self) -> Response:
        return _tlv(b"\x6f", _tlv(b"\x84", self.aid)), SW.OK

    def process(self, apdu: CommandApdu, context: CardContext) -> Response:
        if (apdu.cla, apdu.ins) == (0x00, 0xB0):
            if apdu.p1 != 0x80 | SFI_PUBLIC:
                raise ApduError(SW.FILE_NOT_FOUND)
            return _slice_for_le(self.state.data, apdu.p2, apdu.le), SW.OK
        if (apdu.cla, apdu.ins) == (0x00, 0x88):
            if (apdu.p1, apdu.p2) != (0, 0):
                raise ApduError(SW.WRONG_P1_P2)
            if len(apdu.data) != challenge_bytes:
                raise ApduError(SW.WRONG_LENGTH)
            return driver_cryptogram(self.state.auth_key, apdu.data), SW.OK
        if apdu.ins in (0xB0, 0x88):
            raise ApduError(SW.CLA_NOT_SUPPORTED)
        raise ApduError(SW.INS_NOT_SUPPORTED)
