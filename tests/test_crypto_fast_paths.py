"""The fast paths clearing uses compute exactly what the reference functions compute."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sim_applet import crypto
from sim_applet.crypto import Algorithm
from sim_applet.issuer import TacVerifier, purchase_tac
from sim_applet.personalize import DEMO_ISSUER_KEYS

algorithms = st.sampled_from(list(Algorithm))


@given(algorithm=algorithms, key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=64))
def test_mac_key_equals_cbc_mac(algorithm: Algorithm, key: bytes, data: bytes) -> None:
    key = key[:8] if algorithm is Algorithm.TDES else key
    assert crypto.MacKey(algorithm, key).mac(data) == crypto.cbc_mac(algorithm, key, data)


def test_mac_key_reproduces_the_spec_vector() -> None:
    session_key = bytes.fromhex("003238ABC57659DD")  # card-application.md §6
    assert crypto.MacKey(Algorithm.TDES, session_key).mac(
        bytes.fromhex("00001000")
    ) == bytes.fromhex("56988A13")


@given(
    algorithm=algorithms,
    serial=st.binary(min_size=10, max_size=10),
    amount=st.integers(0, 0xFFFFFFFF),
    seq=st.integers(0, 0xFFFFFFFF),
)
def test_tac_verifier_equals_purchase_tac(
    algorithm: Algorithm, serial: bytes, amount: int, seq: int
) -> None:
    fields = {
        "amount": amount,
        "transaction_type": 6,
        "terminal_id": b"\x00\x11\x22\x33\x44\x55",
        "terminal_seq": seq,
        "date_bcd": bytes.fromhex("20261125"),
        "time_bcd": bytes.fromhex("081500"),
    }
    assert TacVerifier(DEMO_ISSUER_KEYS, algorithm, serial).tac(**fields) == purchase_tac(
        DEMO_ISSUER_KEYS, algorithm, serial, **fields
    )
