"""The e-purse cryptography of card-application.md §3, in its two profiles.

- 3DES profile (algorithm id 00): two-key 3DES key diversification and session keys,
  single-DES CBC-MAC (ISO 9797-1 MAC algorithm 1, padding method 2), 4-byte MACs.
- SM4 profile (algorithm id 04, GB/T 32907): the same data in 16-byte blocks; the parts the
  spec leaves open are project-defined and marked so below.

Keys and data are ``bytes``; nothing here keeps state or touches I/O.
"""

from __future__ import annotations

from enum import IntEnum
from functools import lru_cache

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

mac_bytes = 4


class Algorithm(IntEnum):
    """Algorithm id as the card returns it in INITIALIZE (card-application.md §3)."""

    TDES = 0x00
    SM4 = 0x04

    @classmethod
    def from_name(cls, name: str) -> Algorithm:
        names = {"3des": cls.TDES, "sm4": cls.SM4}
        if name.lower() not in names:
            raise ValueError(f"unknown algorithm {name!r}: use 3des or sm4")
        return names[name.lower()]

    @property
    def label(self) -> str:
        return "3des" if self is Algorithm.TDES else "sm4"

    @property
    def block_bytes(self) -> int:
        return 8 if self is Algorithm.TDES else 16


def _tdes_key(key: bytes) -> bytes:
    """Expand to the 24-byte form pyca/cryptography wants without deprecation warnings."""
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    raise ValueError("a DES key is 8 or 16 bytes")


def _ecb(algorithm: Algorithm, key: bytes, data: bytes) -> bytes:
    if algorithm is Algorithm.TDES:
        cipher = Cipher(TripleDES(_tdes_key(key)), modes.ECB())
    else:
        if len(key) != 16:
            raise ValueError("an SM4 key is 16 bytes")
        cipher = Cipher(algorithms.SM4(key), modes.ECB())
    encryptor = cipher.encryptor()
    return encryptor.update(data) + encryptor.finalize()


def encrypt_block(algorithm: Algorithm, key: bytes, block: bytes) -> bytes:
    assert len(block) % algorithm.block_bytes == 0
    return _ecb(algorithm, key, block)


def pad_method_2(data: bytes, block_bytes: int) -> bytes:
    """ISO/IEC 9797-1 padding method 2: `80`, then `00` to a multiple of the block
    (a full extra block when already aligned)."""
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % block_bytes)


def cbc_mac(algorithm: Algorithm, key: bytes, data: bytes, icv: bytes | None = None) -> bytes:
    """CBC-MAC over method-2-padded data, first 4 bytes (card-application.md §3).

    3DES profile: single DES under an 8-byte key (or 3DES under 16 bytes, used for the
    project-defined maintenance MAC). SM4 profile: SM4 under a 16-byte key.
    """
    block = algorithm.block_bytes
    icv = icv if icv is not None else bytes(block)
    padded = pad_method_2(data, block)
    if algorithm is Algorithm.TDES:
        cipher = Cipher(TripleDES(_tdes_key(key)), modes.CBC(icv))
    else:
        cipher = Cipher(algorithms.SM4(key), modes.CBC(icv))
    encryptor = cipher.encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    return encrypted[-block:][:mac_bytes]


def _complement(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


@lru_cache(maxsize=4096)
def diversify(algorithm: Algorithm, master_key: bytes, serial: bytes) -> bytes:
    """Card key from an issuer master key and the 10-byte application serial number.

    3DES (card-application.md §3): `3DES_MK(D) ‖ 3DES_MK(NOT D)`, D = rightmost 8 bytes.
    SM4 (project-defined): `SM4_MK(D ‖ NOT D)`, one 16-byte block.
    Cached: a POS sees the same cards many times a day, and the result is a pure function.
    """
    if len(master_key) != 16:
        raise ValueError("a master key is 16 bytes")
    d = serial[-8:]
    if algorithm is Algorithm.TDES:
        return _ecb(algorithm, master_key, d) + _ecb(algorithm, master_key, _complement(d))
    return _ecb(algorithm, master_key, d + _complement(d))


def load_session_key(algorithm: Algorithm, dlk: bytes, random: bytes, online_ctc: int) -> bytes:
    """`3DES_DLK(random ‖ online CTC ‖ 80 00)`; SM4: the same data padded with 80 00… to 16."""
    data = random + online_ctc.to_bytes(2, "big")
    return _ecb(algorithm, dlk, pad_method_2(data, algorithm.block_bytes))[
        : _session_key_bytes(algorithm)
    ]


def purchase_session_key(
    algorithm: Algorithm, dpk: bytes, random: bytes, offline_ctc: int, terminal_seq: int
) -> bytes:
    """`3DES_DPK(random ‖ offline CTC ‖ low 2 bytes of terminal transaction seq)`;
    SM4: the same 8 bytes padded with 80 00… to 16 (project-defined)."""
    data = random + offline_ctc.to_bytes(2, "big") + (terminal_seq & 0xFFFF).to_bytes(2, "big")
    if algorithm is Algorithm.SM4:
        data = pad_method_2(data, 16)
    return _ecb(algorithm, dpk, data)[: _session_key_bytes(algorithm)]


def _session_key_bytes(algorithm: Algorithm) -> int:
    return 8 if algorithm is Algorithm.TDES else 16


def tac_key(algorithm: Algorithm, dtk: bytes) -> bytes:
    """3DES: `DTK_left XOR DTK_right` (card-application.md §3). SM4 (project-defined): DTK."""
    if algorithm is Algorithm.TDES:
        return bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))
    return dtk


class MacKey:
    """One key's CBC-MAC, reusing a single ECB context: CBC-MAC is x = E(x XOR block) over
    the padded blocks, so no cipher context need be created per MAC. Equal to ``cbc_mac``
    (tested); for clearing, which checks millions of TACs a day."""

    def __init__(self, algorithm: Algorithm, key: bytes) -> None:
        self.algorithm = algorithm
        if algorithm is Algorithm.TDES:
            cipher = Cipher(TripleDES(_tdes_key(key)), modes.ECB())
        else:
            cipher = Cipher(algorithms.SM4(key), modes.ECB())
        self._encrypt = cipher.encryptor().update

    def mac(self, data: bytes) -> bytes:
        block = self.algorithm.block_bytes
        padded = pad_method_2(data, block)
        state = 0
        for offset in range(0, len(padded), block):
            chunk = int.from_bytes(padded[offset : offset + block], "big")
            state = int.from_bytes(self._encrypt((state ^ chunk).to_bytes(block, "big")), "big")
        return state.to_bytes(block, "big")[:mac_bytes]
