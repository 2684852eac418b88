"""card-application.md §3 and §6: the e-purse cryptography against public known answers,
and each derived value recomputed on a second path from the block cipher alone."""

from __future__ import annotations

from typing import Any

import pytest

from sim_applet import crypto
from sim_applet.crypto import Algorithm
from tests.card_helpers import ALGORITHM_IDS, ALGORITHMS, hex_bytes, load_vectors

SECTION_6 = load_vectors("purchase_3des_card_application_6.json")
SM4_VECTORS = load_vectors("sm4_gbt32907.json")["vectors"]
DES_VECTORS = load_vectors("des_block.json")["vectors"]
PADDING_VECTORS = load_vectors("iso9797_padding_method2.json")["vectors"]


def _section_6_session_key() -> bytes:
    v = SECTION_6
    return crypto.purchase_session_key(
        Algorithm.TDES,
        hex_bytes(v["dpk"]),
        hex_bytes(v["random"]),
        int(v["offline_ctc"], 16),
        int(v["terminal_seq"], 16),
    )


def test_section_6_purchase_session_key() -> None:
    assert _section_6_session_key() == hex_bytes(SECTION_6["session_key"])


def test_section_6_purchase_mac1() -> None:
    v = SECTION_6
    data = hex_bytes(v["amount"] + v["transaction_type"] + v["terminal_id"] + v["date"] + v["time"])
    assert crypto.cbc_mac(Algorithm.TDES, _section_6_session_key(), data) == hex_bytes(v["mac1"])


def test_section_6_purchase_mac2() -> None:
    mac2 = crypto.cbc_mac(Algorithm.TDES, _section_6_session_key(), hex_bytes(SECTION_6["amount"]))
    assert mac2 == hex_bytes(SECTION_6["mac2"])


@pytest.mark.parametrize("vector", SM4_VECTORS, ids=lambda v: v["key"][:8])
def test_sm4_block_gbt32907(vector: dict[str, Any]) -> None:
    ciphertext = crypto.encrypt_block(
        Algorithm.SM4, hex_bytes(vector["key"]), hex_bytes(vector["plaintext"])
    )
    assert ciphertext == hex_bytes(vector["ciphertext"])


@pytest.mark.parametrize("vector", DES_VECTORS, ids=lambda v: v["key"])
def test_an_8_byte_key_is_single_des(vector: dict[str, Any]) -> None:
    ciphertext = crypto.encrypt_block(
        Algorithm.TDES, hex_bytes(vector["key"]), hex_bytes(vector["plaintext"])
    )
    assert ciphertext == hex_bytes(vector["ciphertext"])


@pytest.mark.parametrize(
    "vector", PADDING_VECTORS, ids=lambda v: f"{v['block_bytes']}-{len(v['data']) // 2}B"
)
def test_iso9797_padding_method_2(vector: dict[str, Any]) -> None:
    padded = crypto.pad_method_2(hex_bytes(vector["data"]), vector["block_bytes"])
    assert padded == hex_bytes(vector["padded"])


@pytest.mark.parametrize("block_bytes", [8, 16])
@pytest.mark.parametrize("length", range(0, 34))
def test_padding_method_2_is_reversible_and_always_adds_at_least_one_byte(
    block_bytes: int, length: int
) -> None:
    data = bytes(range(1, length + 1))
    padded = crypto.pad_method_2(data, block_bytes)
    assert len(padded) % block_bytes == 0
    assert len(data) < len(padded) <= len(data) + block_bytes
    assert padded.rstrip(b"\x00")[:-1] == data and padded.rstrip(b"\x00")[-1:] == b"\x80"


def _cbc_mac_by_blocks(algorithm: Algorithm, key: bytes, data: bytes) -> bytes:
    """CBC-MAC rebuilt from single-block encryptions: the second path."""
    block = algorithm.block_bytes
    padded = crypto.pad_method_2(data, block)
    chain = bytes(block)
    for start in range(0, len(padded), block):
        mixed = bytes(a ^ b for a, b in zip(chain, padded[start : start + block], strict=True))
        chain = crypto.encrypt_block(algorithm, key, mixed)
    return chain[: crypto.mac_bytes]


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 16, 18, 33])
@pytest.mark.parametrize(
    ("algorithm", "key_bytes"),
    [(Algorithm.TDES, 8), (Algorithm.TDES, 16), (Algorithm.SM4, 16)],
    ids=["des", "3des", "sm4"],
)
def test_cbc_mac_equals_the_block_by_block_chain(
    algorithm: Algorithm, key_bytes: int, length: int
) -> None:
    key = bytes(range(0x40, 0x40 + key_bytes))
    data = bytes(range(length))
    mac = crypto.cbc_mac(algorithm, key, data)
    assert len(mac) == 4
    assert mac == _cbc_mac_by_blocks(algorithm, key, data)


def test_cbc_mac_of_aligned_data_includes_the_full_padding_block() -> None:
    key = bytes.fromhex("0123456789ABCDEF")
    data = bytes(8)
    first_block_only = crypto.encrypt_block(Algorithm.TDES, key, data)[:4]
    assert crypto.cbc_mac(Algorithm.TDES, key, data) != first_block_only


MASTER = bytes.fromhex("11223344556677888877665544332211")
SERIAL = bytes.fromhex("0000A1B2C3D4E5F60718")


def test_3des_diversification_is_mk_of_d_then_mk_of_not_d() -> None:
    d = SERIAL[-8:]
    not_d = bytes(b ^ 0xFF for b in d)
    expected = crypto.encrypt_block(Algorithm.TDES, MASTER, d) + crypto.encrypt_block(
        Algorithm.TDES, MASTER, not_d
    )
    assert crypto.diversify(Algorithm.TDES, MASTER, SERIAL) == expected


def test_sm4_diversification_is_one_block_of_d_and_not_d() -> None:
    d = SERIAL[-8:]
    block = d + bytes(b ^ 0xFF for b in d)
    assert crypto.diversify(Algorithm.SM4, MASTER, SERIAL) == crypto.encrypt_block(
        Algorithm.SM4, MASTER, block
    )


def test_diversification_uses_only_the_rightmost_8_bytes_of_the_serial() -> None:
    other_head = bytes.fromhex("FFFF") + SERIAL[2:]
    assert crypto.diversify(Algorithm.TDES, MASTER, other_head) == crypto.diversify(
        Algorithm.TDES, MASTER, SERIAL
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_load_session_key_encrypts_random_ctc_and_padding(algorithm: Algorithm) -> None:
    random, ctc = bytes.fromhex("A1B2C3D4"), 0x0102
    block = random + ctc.to_bytes(2, "big") + b"\x80"
    block += bytes(algorithm.block_bytes - len(block))
    expected = crypto.encrypt_block(algorithm, MASTER, block)[: algorithm.block_bytes]
    assert crypto.load_session_key(algorithm, MASTER, random, ctc) == expected


def test_purchase_session_key_uses_the_low_2_bytes_of_the_terminal_seq() -> None:
    random = bytes.fromhex("11223344")
    assert crypto.purchase_session_key(
        Algorithm.TDES, MASTER, random, 7, 0x12340001
    ) == crypto.purchase_session_key(Algorithm.TDES, MASTER, random, 7, 0x00000001)


def test_sm4_purchase_session_key_is_16_bytes_over_the_padded_block() -> None:
    random = bytes.fromhex("11223344")
    block = random + bytes.fromhex("0000 0001 80") + bytes(7)
    key = crypto.purchase_session_key(Algorithm.SM4, MASTER, random, 0, 1)
    assert key == crypto.encrypt_block(Algorithm.SM4, MASTER, block)


def test_3des_tac_key_is_left_xor_right() -> None:
    dtk = bytes.fromhex("0102030405060708F0E0D0C0B0A09080")
    assert crypto.tac_key(Algorithm.TDES, dtk) == bytes.fromhex("F1E2D3C4B5A69788")


def test_sm4_tac_key_is_the_whole_dtk() -> None:
    dtk = bytes(range(16))
    assert crypto.tac_key(Algorithm.SM4, dtk) == dtk


@pytest.mark.parametrize(("name", "algorithm"), [("3des", Algorithm.TDES), ("SM4", Algorithm.SM4)])
def test_algorithm_names_and_ids(name: str, algorithm: Algorithm) -> None:
    assert Algorithm.from_name(name) is algorithm
    assert Algorithm(int(algorithm)) is algorithm
    assert algorithm.label == name.lower()


def test_unknown_algorithm_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        Algorithm.from_name("aes")
