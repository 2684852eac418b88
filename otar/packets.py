"""Secured packets for SMS-PP (ETSI TS 102 225 §5, 3GPP TS 31.115 §4), byte-compatible
with Osmocom pySim's ``OtaDialectSms`` (its public test vectors are in
tests/vectors/ota_pysim.json). Pure functions over bytes; the counter goes in and comes out.

Command packet (platform → SIM), ota.md §1 ("CPL onwards, no UDH"):

    ciphered:   CPL(2) CHL(1) SPI(2) KIc(1) KID(1) TAR(3) | E(CNTR(5) PCNTR(1) CC(8) data pad)
    clear:      CPL(2) CHL(1) SPI(2) KIc(1) KID(1) TAR(3)    CNTR(5) PCNTR(1) CC(8) data

CHL = 13 + length of CC. The CC covers CPL … data (zero-padded), CC field excluded.
Ciphering covers CNTR … data, zero-padded to the block; PCNTR counts the padding. A clear
packet keeps its CPL (ota.md §1, TS 31.115 §4): here, and only here, pySim differs — its
encode_cmd leaves CPL out of a clear packet (while its CC covers one) and its own
decode_cmd cannot read the result; its public vectors, all ciphered, are unaffected. A
packet travels in one SMS behind the UDH ``02 70 00``: at most 137 bytes.

Response packet (SIM → platform), Proof of Receipt, in the SMS user data behind the UDH
``02 71 00``:

    02 71 00 | RPL(2) RHL(1) TAR(3) | CNTR(5) PCNTR(1) STS(1) CC(8) data pad   (ciphered part)

RHL = 10 + length of CC. The CC covers the UDH, RPL … STS and the data with its padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sms_user_data_bytes_max = 140  # 8-bit user data in one SMS, TS 23.040 §9.2.3.24
COMMAND_UDH_BYTES = 3  # 02 70 00: UDHL, IEI 70 (command packet), length 0 — TS 31.115 §4
command_packet_bytes_max = sms_user_data_bytes_max - COMMAND_UDH_BYTES  # no concatenated SMS
cc_bytes = 8
counter_max = 2**40 - 1
POR_UDH = bytes.fromhex("027100")  # UDHL 02, IEI 71 (response packet), length 00


class PorStatus(IntEnum):
    """ETSI TS 102 225 table 5."""

    OK = 0x00
    RC_CC_DS_FAILED = 0x01
    COUNTER_LOW = 0x02
    COUNTER_HIGH = 0x03
    COUNTER_BLOCKED = 0x04
    CIPHERING_ERROR = 0x05
    UNDEFINED_SECURITY_ERROR = 0x06
    INSUFFICIENT_MEMORY = 0x07
    TAR_UNKNOWN = 0x09
    INSUFFICIENT_SECURITY_LEVEL = 0x0A


class OtaError(Exception):
    """A packet the SIM must refuse: ``status`` is the PoR status to answer."""

    def __init__(self, status: PorStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Integrity(IntEnum):  # SPI byte 1 bits 1–2 (and byte 2 bits 3–4 for the PoR)
    NONE = 0
    RC = 1
    CC = 2
    DS = 3


class CounterMode(IntEnum):  # SPI byte 1 bits 4–5
    NONE = 0
    AVAILABLE = 1
    MUST_BE_HIGHER = 2
    MUST_BE_ONE_HIGHER = 3


class PorRequest(IntEnum):  # SPI byte 2 bits 1–2
    NEVER = 0
    ALWAYS = 1
    ON_ERROR = 2


@dataclass(frozen=True)
class Spi:
    """Security Parameter Indicator, TS 102 225 §5.1.1 (2 bytes)."""

    integrity: Integrity = Integrity.CC
    ciphered: bool = True
    counter: CounterMode = CounterMode.MUST_BE_HIGHER
    por: PorRequest = PorRequest.ALWAYS
    por_integrity: Integrity = Integrity.CC
    por_ciphered: bool = True
    por_in_submit: bool = False

    def encode(self) -> bytes:
        first = (self.counter << 3) | (int(self.ciphered) << 2) | self.integrity
        second = (
            (int(self.por_in_submit) << 5)
            | (int(self.por_ciphered) << 4)
            | (self.por_integrity << 2)
            | self.por
        )
        return bytes((first, second))

    @classmethod
    def decode(cls, raw: bytes) -> Spi:
        first, second = raw[0], raw[1]
        try:
            return cls(
                integrity=Integrity(first & 3),
                ciphered=bool(first & 4),
                counter=CounterMode((first >> 3) & 3),
                por=PorRequest(second & 3),
                por_integrity=Integrity((second >> 2) & 3),
                por_ciphered=bool(second & 0x10),
                por_in_submit=bool(second & 0x20),
            )
        except ValueError:
            raise OtaError(PorStatus.UNDEFINED_SECURITY_ERROR, "SPI value reserved") from None


# KIc / KID algorithm nibbles, TS 102 225 §5.1.2–5.1.3 (named as pySim names them)
_CRYPT = {"triple_des_cbc2": 0x5, "aes_cbc": 0x2}
_AUTH = {"triple_des_cbc2": 0x5, "aes_cmac": 0x2}


@dataclass(frozen=True)
class OtaKeyset:
    """A SIM's OTA keys, named as pySim's ``OtaKeyset``; the counter travels separately."""

    algo_crypt: str
    kic_idx: int
    kic: bytes
    algo_auth: str
    kid_idx: int
    kid: bytes

    def __post_init__(self) -> None:
        if self.algo_crypt not in _CRYPT or self.algo_auth not in _AUTH:
            raise ValueError("algorithms: triple_des_cbc2 or aes_cbc / aes_cmac")
        for name, key, algorithm in (
            ("kic", self.kic, self.algo_crypt),
            ("kid", self.kid, self.algo_auth),
        ):
            if algorithm == "triple_des_cbc2":
                if len(key) != 16 or key[:8] == key[8:]:
                    raise ValueError(f"{name}: a two-key 3DES key is 16 bytes with K1 ≠ K2")
            elif len(key) not in (16, 24, 32):
                raise ValueError(f"{name}: an AES key is 16, 24 or 32 bytes")
        if not (0 <= self.kic_idx <= 15 and 0 <= self.kid_idx <= 15):
            raise ValueError("key indexes are 0..15")

    def __repr__(self) -> str:
        return (
            f"OtaKeyset({self.algo_crypt}/{self.algo_auth}, kic_idx={self.kic_idx}, <keys hidden>)"
        )

    @property
    def kic_byte(self) -> int:
        return (self.kic_idx << 4) | _CRYPT[self.algo_crypt]

    @property
    def kid_byte(self) -> int:
        return (self.kid_idx << 4) | _AUTH[self.algo_auth]

    @property
    def block_bytes(self) -> int:
        return 8 if self.algo_crypt == "triple_des_cbc2" else 16

    # The keyset's ciphers, made once (a Cipher makes a fresh context for each message; the
    # IV is always zero): making one checks its algorithm and mode in Python, which cost
    # more than ciphering a packet. A keyset lives as long as its SIM or its cache entry.
    @cached_property
    def _ciphering(self) -> Cipher:
        if self.algo_crypt == "triple_des_cbc2":
            return Cipher(TripleDES(self.kic + self.kic[:8]), modes.CBC(bytes(8)))
        return Cipher(algorithms.AES(self.kic), modes.CBC(bytes(16)))

    @cached_property
    def _cbc_checksum(self) -> Cipher:  # (3DES)
        return Cipher(TripleDES(self.kid + self.kid[:8]), modes.CBC(bytes(8)))

    @cached_property
    def _cmac_key(self) -> algorithms.AES:  # (AES)
        return algorithms.AES(self.kid)

    def encrypt(self, data: bytes) -> bytes:
        assert len(data) % self.block_bytes == 0
        encryptor = self._ciphering.encryptor()
        return encryptor.update(data) + encryptor.finalize()

    def decrypt(self, data: bytes) -> bytes:
        if len(data) % self.block_bytes:
            raise OtaError(PorStatus.CIPHERING_ERROR, "ciphered part is not whole blocks")
        decryptor = self._ciphering.decryptor()
        return decryptor.update(data) + decryptor.finalize()

    def cc(self, data: bytes) -> bytes:
        """3DES: CBC-MAC over data zero-padded to 8, last block. AES: CMAC, first 8 bytes."""
        if self.algo_auth == "triple_des_cbc2":
            encryptor = self._cbc_checksum.encryptor()
            return (encryptor.update(data + bytes(-len(data) % 8)) + encryptor.finalize())[-8:]
        mac = cmac.CMAC(self._cmac_key)
        mac.update(data)
        return mac.finalize()[:cc_bytes]


@dataclass(frozen=True)
class CommandPacket:
    spi: Spi
    kic: int
    kid: int
    tar: bytes
    counter: int
    data: bytes


def _cc_length(integrity: Integrity) -> int:
    if integrity is Integrity.CC:
        return cc_bytes
    if integrity is Integrity.NONE:
        return 0
    raise OtaError(PorStatus.UNDEFINED_SECURITY_ERROR, "only CC integrity is supported")


def encode_command(keyset: OtaKeyset, spi: Spi, tar: bytes, counter: int, data: bytes) -> bytes:
    """The command packet for ``data`` (a TS 102 226 command script), CPL first (pySim's
    layout for a ciphered packet). ValueError when it would not fit one SMS, or when
    ``counter`` does not fit CNTR's 5 bytes (a keyset whose counter is exhausted)."""
    assert len(tar) == 3
    if not 0 <= counter <= counter_max:
        raise ValueError(f"the counter is 5 bytes (0 to {counter_max:010X}), not {counter:X}")
    cc_length = _cc_length(spi.integrity)
    padding = bytes(-(6 + cc_length + len(data)) % keyset.block_bytes) if spi.ciphered else b""
    data += padding
    head = bytes((13 + cc_length,)) + spi.encode() + bytes((keyset.kic_byte, keyset.kid_byte)) + tar
    counters = counter.to_bytes(5, "big") + bytes((len(padding),))
    packet_length = len(head) + len(counters) + len(data) + cc_length
    if 2 + packet_length > command_packet_bytes_max:
        raise ValueError(
            f"the command packet would be {2 + packet_length} bytes, "
            f"{2 + packet_length + COMMAND_UDH_BYTES} with its header 02 70 00: one SMS carries "
            f"{sms_user_data_bytes_max} bytes (a packet at most {command_packet_bytes_max})"
        )
    cpl = packet_length.to_bytes(2, "big")
    cc = keyset.cc(cpl + head + counters + data) if cc_length else b""
    secured = counters + cc + data
    return cpl + head + (keyset.encrypt(secured) if spi.ciphered else secured)


def peek_header(packet: bytes) -> tuple[Spi, int, int, bytes]:
    """SPI, KIc, KID and TAR of a command packet (CPL first), before any key."""
    if len(packet) < 2 + 8:
        raise OtaError(PorStatus.UNDEFINED_SECURITY_ERROR, "shorter than CPL and a header")
    if int.from_bytes(packet[:2], "big") != len(packet) - 2:
        raise OtaError(PorStatus.UNDEFINED_SECURITY_ERROR, "CPL does not match the packet")
    spi = Spi.decode(packet[3:5])
    return spi, packet[5], packet[6], packet[7:10]


def decode_command(keyset: OtaKeyset, packet: bytes) -> CommandPacket:
    """The SIM's side: decipher, check the CC, strip the padding."""
    spi, kic, kid, tar = peek_header(packet)
    cc_length = _cc_length(spi.integrity)
    if packet[2] != 13 + cc_length:
        raise OtaError(PorStatus.UNDEFINED_SECURITY_ERROR, "CHL does not match the SPI")
    head, body = packet[2:10], packet[10:]
    secured = keyset.decrypt(body) if spi.ciphered else body
    if len(secured) < 6 + cc_length:
        raise OtaError(PorStatus.CIPHERING_ERROR, "secured data too short")
    counters, cc, data = secured[:6], secured[6 : 6 + cc_length], secured[6 + cc_length :]
    if cc_length and cc != keyset.cc(packet[:2] + head + counters + data):
        raise OtaError(PorStatus.RC_CC_DS_FAILED, "CC does not verify")
    padding = counters[5]
    if padding > len(data):
        raise OtaError(PorStatus.CIPHERING_ERROR, "PCNTR larger than the data")
    return CommandPacket(
        spi, kic, kid, tar, int.from_bytes(counters[:5], "big"), data[: len(data) - padding]
    )


@dataclass(frozen=True)
class ProofOfReceipt:
    tar: bytes
    counter: int
    status: PorStatus
    data: bytes


def encode_por(
    keyset: OtaKeyset, spi: Spi, tar: bytes, counter: int, status: PorStatus, data: bytes
) -> bytes:
    """SMS user data of a PoR, UDH ``02 71 00`` included (the CC covers it)."""
    cc_length = _cc_length(spi.por_integrity)
    padding = bytes(-(7 + cc_length + len(data)) % keyset.block_bytes) if spi.por_ciphered else b""
    rhl = 10 + cc_length
    rpl = (1 + 3 + 5 + 1 + 1 + cc_length + len(data) + len(padding)).to_bytes(2, "big")
    fixed = rpl + bytes((rhl,)) + tar + counter.to_bytes(5, "big") + bytes((len(padding),))
    fixed += bytes((status,))
    cc = keyset.cc(POR_UDH + fixed + data + padding) if cc_length else b""
    protected = fixed[6:] + cc + data + padding
    if spi.por_ciphered:
        protected = keyset.encrypt(protected)
    return POR_UDH + fixed[:6] + protected


def decode_por(keyset: OtaKeyset, spi: Spi, user_data: bytes) -> ProofOfReceipt:
    """The platform's side: the PoR a SIM sent, its CC checked."""
    if user_data[:3] != POR_UDH:
        raise ValueError("not a response packet: UDH 02 71 00 expected")
    head, body = user_data[3:9], user_data[9:]
    rhl = head[2]
    cc_length = rhl - 10
    if cc_length != _cc_length(spi.por_integrity):
        raise ValueError("RHL does not match the PoR integrity asked for")
    plain = keyset.decrypt(body) if spi.por_ciphered else body
    counters_status, cc, rest = plain[:7], plain[7 : 7 + cc_length], plain[7 + cc_length :]
    if cc_length and cc != keyset.cc(POR_UDH + head + counters_status + rest):
        raise ValueError("PoR CC does not verify")
    padding = counters_status[5]
    return ProofOfReceipt(
        head[3:6],
        int.from_bytes(counters_status[:5], "big"),
        PorStatus(counters_status[6]),
        rest[: len(rest) - padding],
    )
