"""``card ota``, ``card ota-keys`` and ``ota encode`` at their limits: a packet the SIM cannot
read, a script over one SMS or over the command count, an exhausted counter, and the round
trip ``ota encode`` → ``card ota`` for every keyset a card image can hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otar.keys import DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID, demo_keyset
from otar.packets import (
    CounterMode,
    Integrity,
    OtaKeyset,
    PorRequest,
    PorStatus,
    Spi,
    counter_max,
    decode_command,
    decode_por,
    encode_command,
)
from otar.remote_apdu import CompactResponse
from otar.sim_side import TRANSIT_TAR, OtaSecurityDomain
from sim_applet.personalize import personalize
from sim_applet.sim import Sim
from tests.test_cli import run

SERIAL = bytes.fromhex("20260000000000000042")
SELECT = "00A4040008A00000063201010500"
GET_BALANCE = "805C000204"
PLAIN_POR = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)
TDES = OtaKeyset(
    "triple_des_cbc2",
    3,
    bytes.fromhex("300102030405060708090a0b0c0d0e0f"),
    "triple_des_cbc2",
    3,
    bytes.fromhex("301102030405060708090a0b0c0d0e0f"),
)


def image_with(tmp_path: Path, keyset: OtaKeyset | None = None, last: int | None = None) -> Path:
    """A card image with the demo OTA keyset, or ``keyset``, and a last counter seen."""
    sim = personalize(
        SERIAL, balance_fen=1000, ota_masters=(DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID)
    )
    if keyset is not None:
        sim.ota = OtaSecurityDomain({keyset.kic_idx: keyset})
    if last is not None:
        sim.ota.last_counters = {next(iter(sim.ota.keysets)): last}
    path = tmp_path / "phone.json"
    sim.save(path)
    return path


def keyset_of(image: Path) -> OtaKeyset:
    return next(iter(Sim.load(image).ota.keysets.values()))


UNREADABLE = ["0038", "00", "DEADBEEF", "0008" + "151223" + "0000425553"]  # the last: SPI reserved


@pytest.mark.parametrize("packet", UNREADABLE)
def test_card_ota_without_a_proof_of_receipt_says_why_and_exits_1(
    tmp_path: Path, packet: str
) -> None:
    answer = run("card", "ota", str(image_with(tmp_path)), packet)
    assert (answer.returncode, answer.stdout) == (1, "")
    assert answer.stderr.startswith("no Proof of Receipt: ") and answer.stderr.count("\n") == 1
    assert "CPL" in answer.stderr


def test_card_ota_says_when_the_packet_asked_for_no_proof_of_receipt(tmp_path: Path) -> None:
    image = image_with(tmp_path)
    silent = Spi(por=PorRequest.NEVER)
    packet = encode_command(keyset_of(image), silent, TRANSIT_TAR, 1, bytes.fromhex(GET_BALANCE))
    answer = run("card", "ota", str(image), packet.hex())
    assert (answer.returncode, answer.stdout) == (1, "")
    assert "asks for none" in answer.stderr
    assert "exit 1" in run("card", "ota", "--help").stdout.replace("\n", " ")


@pytest.mark.parametrize("keys", ["aes", "3des", "aes-after-rekey"])
def test_ota_encode_then_card_ota_round_trips_for_every_keyset(tmp_path: Path, keys: str) -> None:
    if keys == "3des":
        image = image_with(tmp_path, TDES)
    elif keys == "aes-after-rekey":
        image = image_with(tmp_path, demo_keyset(Sim.load(image_with(tmp_path)).iccid, 2), 41)
    else:
        image = image_with(tmp_path)
    packet = run("ota", "encode", str(image), SELECT, GET_BALANCE)
    assert packet.returncode == 0, packet.stderr
    answer = run("card", "ota", str(image), packet.stdout.strip())
    assert answer.returncode == 0, answer.stderr
    por = decode_por(keyset_of(image), Spi(), bytes.fromhex(answer.stdout.strip()))
    balance = CompactResponse.decode(por.data)
    assert (por.status, balance.last_sw, balance.last_data) == (
        PorStatus.OK,
        0x9000,
        (1000).to_bytes(4, "big"),
    )


@pytest.mark.parametrize("integrity", [Integrity.CC, Integrity.NONE])
@pytest.mark.parametrize("keyset", [TDES, demo_keyset("8986001234567890123")], ids=["3des", "aes"])
def test_an_unciphered_packet_has_its_cpl_and_the_transit_tar_answers_0a(
    tmp_path: Path, integrity: Integrity, keyset: OtaKeyset
) -> None:
    """ota.md §1: every command packet starts with CPL (pySim writes none on a clear one,
    and its own decode_cmd cannot read that); §3: below the transit TAR's minimum security
    the SIM answers PoR 0A and runs nothing."""
    clear = Spi(integrity=integrity, ciphered=False)
    script = bytes.fromhex(GET_BALANCE)
    packet = encode_command(keyset, clear, TRANSIT_TAR, 5, script)
    assert int.from_bytes(packet[:2], "big") == len(packet) - 2
    decoded = decode_command(keyset, packet)
    assert (decoded.spi, decoded.counter, decoded.data) == (clear, 5, script)
    image = image_with(tmp_path, keyset)
    answer = run("card", "ota", str(image), packet.hex())
    assert answer.returncode == 0, answer.stderr
    por = decode_por(keyset, PLAIN_POR, bytes.fromhex(answer.stdout.strip()))
    assert por.status is PorStatus.INSUFFICIENT_SECURITY_LEVEL
    assert Sim.load(image).ota.last_counters == {}


def test_ota_encode_refuses_a_packet_over_one_sms(tmp_path: Path) -> None:
    image = image_with(tmp_path)
    assert run("ota", "encode", str(image), *[SELECT] * 7).returncode == 0
    for count, size in ((8, 138), (16, 250)):
        result = run("ota", "encode", str(image), *[SELECT] * count)
        assert (result.returncode, result.stdout) == (2, "")
        assert f"{size} bytes" in result.stderr and "140" in result.stderr
    with pytest.raises(ValueError, match="138 bytes"):
        encode_command(keyset_of(image), Spi(), TRANSIT_TAR, 1, bytes.fromhex(SELECT) * 8)


def test_ota_encode_gives_the_reason_for_too_many_apdus(tmp_path: Path) -> None:
    result = run("ota", "encode", str(image_with(tmp_path)), *[GET_BALANCE] * 17)
    assert result.returncode == 2
    assert "at most 16" in result.stderr and "17" in result.stderr


def test_an_exhausted_counter_is_said_clearly(tmp_path: Path) -> None:
    image = image_with(tmp_path)
    last = encode_command(
        keyset_of(image), Spi(), TRANSIT_TAR, counter_max, bytes.fromhex(GET_BALANCE)
    )
    assert run("card", "ota", str(image), last.hex()).returncode == 0
    keys = run("card", "ota-keys", str(image))
    assert keys.returncode == 1 and json.loads(keys.stdout)["cntr"] is None
    assert "exhausted" in keys.stderr and "FFFFFFFFFF" in keys.stderr
    encoded = run("ota", "encode", str(image), GET_BALANCE)
    assert (encoded.returncode, encoded.stdout) == (1, "")
    assert "exhausted" in encoded.stderr and "FFFFFFFFFF" in encoded.stderr
    with pytest.raises(ValueError, match="counter"):
        encode_command(keyset_of(image), Spi(), TRANSIT_TAR, counter_max + 1, b"")
