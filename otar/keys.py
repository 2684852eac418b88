"""Per-SIM OTA keysets from the platform's OTA master keys and the SIM's ICCID, per key
version; and GlobalPlatform PUT KEY, which replaces a SIM's keyset over the air.

Project-defined derivation (ota.md §3): a 16-byte block = ICCID digits as BCD, F-padded to
14 bytes ‖ purpose ‖ FF − (version − 1). KIc = AES-128-ECB(master KIc, block with purpose
FF), KID likewise under the master KID, the key-encryption key (KEK, GlobalPlatform's DEK)
under the master KID with purpose EE. AES-CBC ciphering and AES-CMAC; the key index (KIc
and KID bits 5–8) is the key version, 1–15. Version 1's blocks are the ICCID F-padded to
16 bytes. The platform derives keys on the fly; the SIM holds its own.

PUT KEY (GlobalPlatform Card Specification 2.2 §11.8, AES keys per Amendment D):
``80 D8 P1 81 Lc … 00`` with P1 the version replaced (00: add), data = new version ‖ for KIc,
KID and KEK: ``88 11 10 ‖ AES-ECB(KEK of the current version, key) ‖ 03 ‖ KCV`` where KCV
is the first 3 bytes of AES(key, 16 × 01). The card answers new version ‖ the three KCVs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from otar.packets import OtaKeyset

DEMO_OTA_MASTER_KIC = bytes.fromhex("4F544D4B4943303030303030303030AA")  # documented test keys
DEMO_OTA_MASTER_KID = bytes.fromhex("4F544D4B4944303030303030303030BB")
KEY_VERSION_MAX = 15  # the key index is 4 bits of KIc/KID
PURPOSE_KEY, PURPOSE_KEK = 0xFF, 0xEE
KEY_TYPE_AES = 0x88
PUT_KEY_CLA, PUT_KEY_INS, PUT_KEY_P2_MULTIPLE = 0x80, 0xD8, 0x81


def _block(iccid: str, purpose: int, version: int) -> bytes:
    if not iccid.isdigit() or not 18 <= len(iccid) <= 20:
        raise ValueError("an ICCID is 18–20 digits")
    if not 1 <= version <= KEY_VERSION_MAX:
        raise ValueError(f"an OTA key version is 1..{KEY_VERSION_MAX}")
    return bytes.fromhex(iccid.ljust(28, "F")) + bytes((purpose, 0xFF - (version - 1)))


def _aes_ecb(key: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def _aes_ecb_decrypt(key: bytes, block: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return decryptor.update(block) + decryptor.finalize()


def derive_keyset(master_kic: bytes, master_kid: bytes, iccid: str, version: int = 1) -> OtaKeyset:
    return OtaKeyset(
        "aes_cbc",
        version,
        _aes_ecb(master_kic, _block(iccid, PURPOSE_KEY, version)),
        "aes_cmac",
        version,
        _aes_ecb(master_kid, _block(iccid, PURPOSE_KEY, version)),
    )


def derive_kek(master_kid: bytes, iccid: str, version: int = 1) -> bytes:
    return _aes_ecb(master_kid, _block(iccid, PURPOSE_KEK, version))


def demo_keyset(iccid: str, version: int = 1) -> OtaKeyset:
    return derive_keyset(DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID, iccid, version)


def key_check_value(key: bytes) -> bytes:
    return _aes_ecb(key, b"\x01" * 16)[:3]


@dataclass(frozen=True)
class NewKeys:
    version: int
    kic: bytes
    kid: bytes
    kek: bytes

    def __repr__(self) -> str:  # keys never reach a log
        return f"NewKeys(version {self.version}, <hidden>)"


def put_key_command(current_kek: bytes, current_version: int, new: NewKeys) -> bytes:
    """The PUT KEY C-APDU that replaces version ``current_version`` by ``new``."""
    data = bytes((new.version,))
    for key in (new.kic, new.kid, new.kek):
        data += bytes((KEY_TYPE_AES, 0x11, 0x10)) + _aes_ecb(current_kek, key)
        data += b"\x03" + key_check_value(key)
    header = bytes((PUT_KEY_CLA, PUT_KEY_INS, current_version, PUT_KEY_P2_MULTIPLE, len(data)))
    return header + data + b"\x00"  # Le: the card answers the key check values


def expected_put_key_response(new: NewKeys) -> bytes:
    return bytes((new.version,)) + b"".join(
        key_check_value(key) for key in (new.kic, new.kid, new.kek)
    )


class PutKeyInvalid(ValueError):
    pass


def open_put_key(kek: bytes, data: bytes) -> NewKeys:
    """The card's side: decrypt and check the three keys (KCV) of a PUT KEY's data."""
    if len(data) != 1 + 3 * 23:
        raise PutKeyInvalid("PUT KEY data is a version and three AES key blocks")
    keys = []
    for offset in range(1, len(data), 23):
        field = data[offset : offset + 23]
        if field[:3] != bytes((KEY_TYPE_AES, 0x11, 0x10)) or field[19] != 3:
            raise PutKeyInvalid("an AES key block is 88 11 10 key 03 KCV")
        key = _aes_ecb_decrypt(kek, field[3:19])
        if key_check_value(key) != field[20:23]:
            raise PutKeyInvalid("a key's check value does not match")
        keys.append(key)
    if not 1 <= data[0] <= KEY_VERSION_MAX:
        raise PutKeyInvalid(f"a key version is 1..{KEY_VERSION_MAX}")
    return NewKeys(data[0], *keys)
