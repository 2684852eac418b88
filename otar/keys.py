"""Per-SIM OTA keysets from the platform's OTA master keys and the SIM's ICCID.

Project-defined derivation (ota.md §3): KIc = AES-128-ECB(master KIc, ICCID digits as BCD,
padded with F to 16 bytes), KID likewise under the master KID; AES-CBC ciphering and
AES-CMAC, key index 1. The platform derives them on the fly; the SIM holds its own.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from otar.packets import OtaKeyset

DEMO_OTA_MASTER_KIC = bytes.fromhex("4F544D4B4943303030303030303030AA")  # documented test keys
DEMO_OTA_MASTER_KID = bytes.fromhex("4F544D4B4944303030303030303030BB")


def _iccid_block(iccid: str) -> bytes:
    if not iccid.isdigit() or not 18 <= len(iccid) <= 20:
        raise ValueError("an ICCID is 18–20 digits")
    return bytes.fromhex(iccid.ljust(32, "F"))


def _aes_ecb(key: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def derive_keyset(master_kic: bytes, master_kid: bytes, iccid: str) -> OtaKeyset:
    block = _iccid_block(iccid)
    return OtaKeyset(
        "aes_cbc", 1, _aes_ecb(master_kic, block), "aes_cmac", 1, _aes_ecb(master_kid, block)
    )


def demo_keyset(iccid: str) -> OtaKeyset:
    return derive_keyset(DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID, iccid)
