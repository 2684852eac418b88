"""The PSAM, the bus POS's secure module (card-application.md §4).

It holds the purchase master keys (by key version), the maintenance master key for
blacklist blocking, the driver-card master key, a 6-byte terminal id and the 4-byte
terminal transaction sequence. It derives a card's DPK, computes MAC1 and verifies MAC2.
It never reveals a key: every answer is a MAC, a sequence number or a status word.

Commands (CLA 80; `80 70`/`80 72` per card-application.md §4, the rest project-defined):

- READ TERMINAL ID `00 B0 96 00 06` (SFI 0x16, where real PSAMs keep it) → terminal id (6).
- INIT FOR PURCHASE MAC1 `80 70 00 00 1E`: card random (4) · offline CTC (2) · amount (4) ·
  type (1) · date (4) · time (3) · key version (1) · algorithm id (1) · card serial (10)
  → terminal seq (4) · MAC1 (4); the sequence then advances.
- VERIFY MAC2 `80 72 00 00 04` MAC2 → `90 00` or `93 02`; only right after its MAC1.
- BLOCK MAC `80 7C 00 00 0F`: card serial (10) · algorithm id (1) · challenge (4) → the MAC
  of APPLICATION BLOCK only (a POS may block a blacklisted card, never unblock one).
- VERIFY DRIVER CARD `80 7E 00 00 1A`: card serial (10) · challenge (8) · cryptogram (8)
  → `90 00` or `93 02`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from sim_applet import crypto
from sim_applet.apdu import SW, ApduError, CommandApdu, parse_command, response
from sim_applet.crypto import Algorithm
from sim_applet.driver_card import driver_cryptogram
from sim_applet.purse import maintenance_mac
from sim_applet.structures import APPLICATION_BLOCK_HEADER, TYPE_CAPP_PURCHASE, TYPE_PURCHASE

TERMINAL_ID_SFI = 0x16
terminal_seq_max = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Mac1Request:
    """Data of `80 70`: what the PSAM needs to compute the purchase MAC1."""

    card_random: bytes
    offline_ctc: int
    amount: int
    transaction_type: int
    date_bcd: bytes
    time_bcd: bytes
    key_version: int
    algorithm: Algorithm
    serial: bytes

    def encode(self) -> bytes:
        return (
            self.card_random
            + self.offline_ctc.to_bytes(2, "big")
            + self.amount.to_bytes(4, "big")
            + bytes((self.transaction_type,))
            + self.date_bcd
            + self.time_bcd
            + bytes((self.key_version, self.algorithm))
            + self.serial
        )

    @classmethod
    def decode(cls, data: bytes) -> Mac1Request:
        if len(data) != 30:
            raise ValueError("MAC1 request is 30 bytes")
        return cls(
            card_random=data[0:4],
            offline_ctc=int.from_bytes(data[4:6], "big"),
            amount=int.from_bytes(data[6:10], "big"),
            transaction_type=data[10],
            date_bcd=data[11:15],
            time_bcd=data[15:18],
            key_version=data[18],
            algorithm=Algorithm(data[19]),
            serial=data[20:30],
        )

    def command(self) -> CommandApdu:
        return CommandApdu(0x80, 0x70, 0x00, 0x00, self.encode(), 0x08)


READ_TERMINAL_ID = CommandApdu(0x00, 0xB0, 0x80 | TERMINAL_ID_SFI, 0x00, b"", 6)


def verify_mac2(mac2: bytes) -> CommandApdu:
    return CommandApdu(0x80, 0x72, 0x00, 0x00, mac2)


def block_mac_request(serial: bytes, algorithm: Algorithm, challenge: bytes) -> CommandApdu:
    return CommandApdu(0x80, 0x7C, 0x00, 0x00, serial + bytes((algorithm,)) + challenge, 4)


def verify_driver_card(serial: bytes, challenge: bytes, cryptogram: bytes) -> CommandApdu:
    return CommandApdu(0x80, 0x7E, 0x00, 0x00, serial + challenge + cryptogram)


@dataclass
class PsamKeys:
    purchase_by_version: dict[int, bytes]
    maintenance: bytes | None = None
    driver_card: bytes | None = None

    def __repr__(self) -> str:
        return "PsamKeys(<hidden>)"


@dataclass
class Psam:
    keys: PsamKeys = field(repr=False)
    terminal_id: bytes
    terminal_seq: int = 1
    _pending_mac2: tuple[Algorithm, bytes, bytes] | None = field(default=None, repr=False)

    def transmit(self, command: bytes) -> bytes:
        try:
            apdu = parse_command(command)
            data = self._dispatch(apdu)
        except ApduError as error:
            return response(b"", error.sw)
        return response(data)

    def _dispatch(self, apdu: CommandApdu) -> bytes:
        key = (apdu.cla, apdu.ins)
        if key != (0x80, 0x72):
            self._pending_mac2 = None  # MAC2 is verified right after its MAC1 or never
        if key == (0x00, 0xB0):
            if (apdu.p1, apdu.p2) != (0x80 | TERMINAL_ID_SFI, 0):
                raise ApduError(SW.FILE_NOT_FOUND)
            return self.terminal_id
        handler = {
            (0x80, 0x70): self._mac1,
            (0x80, 0x72): self._verify_mac2,
            (0x80, 0x7C): self._block_mac,
            (0x80, 0x7E): self._verify_driver_card,
        }.get(key)
        if handler is None:
            raise ApduError(SW.INS_NOT_SUPPORTED)
        if (apdu.p1, apdu.p2) != (0, 0):
            raise ApduError(SW.WRONG_P1_P2)
        return handler(apdu.data)

    def _mac1(self, data: bytes) -> bytes:
        try:
            request = Mac1Request.decode(data)
        except ValueError:
            raise ApduError(SW.WRONG_LENGTH) from None
        if request.transaction_type not in (TYPE_PURCHASE, TYPE_CAPP_PURCHASE):
            raise ApduError(SW.WRONG_DATA, "PSAM computes purchase MACs only")
        master = self.keys.purchase_by_version.get(request.key_version)
        if master is None:
            raise ApduError(SW.KEY_INDEX_NOT_SUPPORTED, "no purchase key of that version")
        if self.terminal_seq > terminal_seq_max:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "terminal sequence exhausted")
        algorithm = request.algorithm
        dpk = crypto.diversify(algorithm, master, request.serial)
        seq = self.terminal_seq
        session_key = crypto.purchase_session_key(
            algorithm, dpk, request.card_random, request.offline_ctc, seq
        )
        amount = request.amount.to_bytes(4, "big")
        mac1 = crypto.cbc_mac(
            algorithm,
            session_key,
            amount
            + bytes((request.transaction_type,))
            + self.terminal_id
            + request.date_bcd
            + request.time_bcd,
        )
        self.terminal_seq = seq + 1
        self._pending_mac2 = (algorithm, session_key, amount)
        return seq.to_bytes(4, "big") + mac1

    def _verify_mac2(self, data: bytes) -> bytes:
        pending, self._pending_mac2 = self._pending_mac2, None
        if pending is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no MAC1 computed")
        if len(data) != 4:
            raise ApduError(SW.WRONG_LENGTH)
        algorithm, session_key, amount = pending
        if not hmac.compare_digest(crypto.cbc_mac(algorithm, session_key, amount), data):
            raise ApduError(SW.MAC_INVALID, "MAC2")
        return b""

    def _block_mac(self, data: bytes) -> bytes:
        if self.keys.maintenance is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no maintenance key in this PSAM")
        if len(data) != 15:
            raise ApduError(SW.WRONG_LENGTH)
        serial, algorithm_id, challenge = data[:10], data[10], data[11:15]
        try:
            algorithm = Algorithm(algorithm_id)
        except ValueError:
            raise ApduError(SW.WRONG_DATA) from None
        damk = crypto.diversify(algorithm, self.keys.maintenance, serial)
        return maintenance_mac(algorithm, damk, challenge, APPLICATION_BLOCK_HEADER)

    def _verify_driver_card(self, data: bytes) -> bytes:
        if self.keys.driver_card is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no driver-card key in this PSAM")
        if len(data) != 26:
            raise ApduError(SW.WRONG_LENGTH)
        serial, challenge, cryptogram = data[:10], data[10:18], data[18:26]
        auth_key = crypto.diversify(Algorithm.TDES, self.keys.driver_card, serial)
        if not hmac.compare_digest(driver_cryptogram(auth_key, challenge), cryptogram):
            raise ApduError(SW.MAC_INVALID, "driver card cryptogram")
        return b""
