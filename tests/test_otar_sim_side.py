"""The SIM's OTA security domain: what runs, what is refused, and the PoR for each."""

from __future__ import annotations

from otar.keys import demo_keyset
from otar.packets import (
    CounterMode,
    Integrity,
    PorRequest,
    PorStatus,
    Spi,
    decode_por,
    encode_command,
)
from otar.remote_apdu import CompactResponse, encode_script
from otar.sim_side import TRANSIT_TAR, OtaSecurityDomain
from sim_applet.structures import GET_BALANCE, TRANSIT_AID, select_by_aid
from tests.helpers import new_card

ICCID = "8986001234567890123"
KEYS = demo_keyset(ICCID)
SCRIPT = encode_script([select_by_aid(TRANSIT_AID).encode(), GET_BALANCE.encode()])


def sim_runner():  # type: ignore[no-untyped-def]
    card, ran = new_card(balance_fen=1234), []

    def run(tar: bytes, apdus: list[bytes]) -> list[bytes]:
        ran.extend(apdus)
        return [card.transmit(apdu) for apdu in apdus]

    return run, ran


def test_a_secured_packet_runs_and_its_por_carries_the_last_answer() -> None:
    domain, (run, ran) = OtaSecurityDomain({1: KEYS}), sim_runner()
    por = domain.process(encode_command(KEYS, Spi(), TRANSIT_TAR, 7, SCRIPT), run)
    decoded = decode_por(KEYS, Spi(), por)
    response = CompactResponse.decode(decoded.data)
    assert (decoded.status, decoded.counter) == (PorStatus.OK, 7)
    assert (response.commands_executed, response.last_sw, response.last_data) == (
        2,
        0x9000,
        (1234).to_bytes(4, "big"),
    )
    assert len(ran) == 2 and domain.last_counters == {1: 7}


def test_a_replayed_packet_runs_nothing() -> None:
    domain, (run, ran) = OtaSecurityDomain({1: KEYS}), sim_runner()
    packet = encode_command(KEYS, Spi(), TRANSIT_TAR, 7, SCRIPT)
    domain.process(packet, run)
    por = domain.process(packet, run)
    plain = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)
    assert decode_por(KEYS, plain, por).status is PorStatus.COUNTER_LOW and len(ran) == 2


def test_below_the_minimum_security_level_nothing_runs() -> None:
    domain, (run, ran) = OtaSecurityDomain({1: KEYS}), sim_runner()
    weak = Spi(counter=CounterMode.AVAILABLE)
    por = domain.process(encode_command(KEYS, weak, TRANSIT_TAR, 1, SCRIPT), run)
    plain = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)
    assert decode_por(KEYS, plain, por).status is PorStatus.INSUFFICIENT_SECURITY_LEVEL
    assert ran == [] and domain.last_counters == {}


def test_a_forged_cc_and_an_unknown_tar_are_refused() -> None:
    domain, (run, ran) = OtaSecurityDomain({1: KEYS}), sim_runner()
    plain = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)
    packet = bytearray(encode_command(KEYS, Spi(), TRANSIT_TAR, 1, SCRIPT))
    packet[-1] ^= 1
    assert decode_por(KEYS, plain, domain.process(bytes(packet), run)).status in (
        PorStatus.RC_CC_DS_FAILED,
        PorStatus.CIPHERING_ERROR,
    )
    other = encode_command(KEYS, Spi(), b"\x00\x00\x01", 2, SCRIPT)
    assert decode_por(KEYS, plain, domain.process(other, run)).status is PorStatus.TAR_UNKNOWN
    assert ran == []


def test_the_domain_persists_its_counters() -> None:
    domain, (run, _) = OtaSecurityDomain({1: KEYS}), sim_runner()
    domain.process(encode_command(KEYS, Spi(), TRANSIT_TAR, 9, SCRIPT), run)
    restored = OtaSecurityDomain.from_dict(domain.to_dict())
    assert restored.last_counters == {1: 9} and restored.keysets[1] == KEYS
