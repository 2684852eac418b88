"""Secured packets against pySim's public vectors, round trips, and forgeries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otar.packets import (
    CounterMode,
    Integrity,
    OtaError,
    OtaKeyset,
    PorRequest,
    PorStatus,
    Spi,
    decode_command,
    decode_por,
    encode_command,
    encode_por,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "ota_pysim.json").read_text())
TAR = bytes.fromhex("B00011")
APDU = bytes.fromhex("00a40004023f00")


def keyset(name: str) -> OtaKeyset:
    data = VECTORS["keysets"][name]
    return OtaKeyset(
        data["algo_crypt"],
        data["kic_idx"],
        bytes.fromhex(data["kic"]),
        data["algo_auth"],
        data["kid_idx"],
        bytes.fromhex(data["kid"]),
    )


def spi(case: dict) -> Spi:
    return Spi(
        Integrity.CC,
        True,
        CounterMode.NONE,
        PorRequest.ALWAYS,
        Integrity[case["por_integrity"]],
        case["por_ciphered"],
    )


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_command_packets_are_byte_exact_with_pysim(case: dict) -> None:
    packet = encode_command(keyset(case["keyset"]), spi(case), TAR, 0, APDU)
    assert packet.hex() == case["command"]
    decoded = decode_command(keyset(case["keyset"]), packet)
    assert (decoded.tar, decoded.counter, decoded.data, decoded.spi) == (TAR, 0, APDU, spi(case))


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_proofs_of_receipt_are_byte_exact_with_pysim(case: dict) -> None:
    por = decode_por(keyset(case["keyset"]), spi(case), bytes.fromhex(case["por"]))
    assert (por.status, por.counter, por.data.hex()) == (PorStatus.OK, 0, case["por_data"])
    rebuilt = encode_por(
        keyset(case["keyset"]), spi(case), TAR, 0, PorStatus.OK, bytes.fromhex(case["por_data"])
    )
    assert rebuilt.hex() == case["por"]


def test_one_flipped_bit_fails_the_cc() -> None:
    case = VECTORS["cases"][1]  # ciphered command
    packet = bytearray(bytes.fromhex(case["command"]))
    packet[-1] ^= 1
    with pytest.raises(OtaError) as refused:
        decode_command(keyset(case["keyset"]), bytes(packet))
    assert refused.value.status in (PorStatus.RC_CC_DS_FAILED, PorStatus.CIPHERING_ERROR)
    por = bytearray(bytes.fromhex(case["por"]))
    por[-1] ^= 1
    with pytest.raises(ValueError, match="CC"):
        decode_por(keyset(case["keyset"]), spi(case), bytes(por))


def test_a_wrong_key_cannot_decode() -> None:
    case = VECTORS["cases"][0]
    other = OtaKeyset(
        "triple_des_cbc2", 3, bytes(range(16)), "triple_des_cbc2", 3, bytes(range(1, 17))
    )
    with pytest.raises(OtaError):
        decode_command(other, bytes.fromhex(case["command"]))


def test_degenerate_3des_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="K1"):
        OtaKeyset("triple_des_cbc2", 1, bytes(8) * 2, "triple_des_cbc2", 1, bytes(range(16)))
    assert "hidden" in repr(keyset("3des_sja5"))


@given(
    name=st.sampled_from(["3des_sja5", "aes128_sja5"]),
    data=st.binary(min_size=1, max_size=90),
    counter=st.integers(0, 2**40 - 1),
    status=st.sampled_from(list(PorStatus)),
)
def test_round_trips(name: str, data: bytes, counter: int, status: PorStatus) -> None:
    keys, security = keyset(name), Spi()
    decoded = decode_command(keys, encode_command(keys, security, TAR, counter, data))
    assert (decoded.data, decoded.counter) == (data, counter)
    por = decode_por(keys, security, encode_por(keys, security, TAR, counter, status, data))
    assert (por.data, por.counter, por.status) == (data, counter, status)
