"""A SIM is a file (sim_applet/image.py): the image saves and loads exactly, and anything
that is not an intact image of this version is refused with a clear ImageError."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from reader_sim.psam import verify_driver_card
from sim_applet.driver_card import DRIVER_AID, DriverCard, DriverData, internal_authenticate
from sim_applet.image import (
    IMAGE_FORMAT,
    IMAGE_VERSION,
    ImageError,
    decode_image,
    encode_image,
    sim_to_dict,
)
from sim_applet.personalize import personalize_driver_card
from sim_applet.sim import Sim
from sim_applet.structures import (
    GET_BALANCE,
    SFI_CAPP,
    SFI_LOG,
    SFI_PUBLIC,
    TRANSIT_AID,
    read_binary,
    read_record,
    select_by_aid,
    verify_pin,
)
from tests.card_helpers import (
    ALGORITHM_IDS,
    ALGORITHMS,
    PIN,
    load,
    maintenance_command,
    new_psam,
    new_sim,
    ok,
    purchase,
    purse_of,
    seeded,
    state_of,
)

DRIVER = DriverData(
    bytes.fromhex("D0000000000000000007"), "D007", "BUS-CO-1", "F1", "王伟", date(2036, 12, 31)
)


def _used_card(algorithm: Any) -> Sim:
    """A card with history in every persistent field: loads, purchases, a compound record,
    a spent PIN try and a block."""
    sim, psam = new_sim(algorithm=algorithm, balance_fen=100), new_psam()
    load(sim, 900)
    purchase(sim, psam, 120)
    purchase(sim, psam, 80, capp=True, capp_update=(3, b"\x01\x02\x03"))
    sim.transmit(verify_pin(bytes.fromhex("0000")).encode())
    ok(sim, maintenance_command(sim))
    return sim


def _script(sim: Sim) -> list[bytes]:
    """The same commands on a card: its answers (the card is reselected first)."""
    commands = [
        select_by_aid(TRANSIT_AID),
        GET_BALANCE,
        read_binary(SFI_PUBLIC),
        read_record(SFI_LOG, 1),
        read_record(SFI_LOG, 3),
        read_record(SFI_CAPP, 3),
        verify_pin(PIN),
    ]
    return [sim.transmit(command.encode()) for command in commands]


def _body(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)["sim"]  # type: ignore[no-any-return]


def _reseal(document: dict[str, Any]) -> bytes:
    """Re-sign an edited body, so that only the edit is wrong, not the checksum."""
    canonical = json.dumps(document["sim"], sort_keys=True, separators=(",", ":")).encode()
    document["sha256"] = hashlib.sha256(canonical).hexdigest()
    return json.dumps(document).encode()


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_save_then_load_is_exact_and_the_card_answers_the_same(
    algorithm: Any, tmp_path: Path
) -> None:
    original = _used_card(algorithm)
    path = tmp_path / "card.json"
    original.save(path)
    loaded = Sim.load(path, random_source=seeded(99))

    assert sim_to_dict(loaded) == sim_to_dict(original)
    assert loaded.iccid == original.iccid and loaded.atr == original.atr
    assert _script(loaded) == _script(original)


def test_a_loaded_card_keeps_transacting(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    new_sim(balance_fen=500).save(path)
    loaded = Sim.load(path, random_source=seeded(5))
    ok(loaded, select_by_aid(TRANSIT_AID))
    purchase(loaded, new_psam(), 200)
    load(loaded, 50)
    assert state_of(loaded).balance == 350


def test_encode_is_deterministic_and_reencodes_to_the_same_bytes() -> None:
    raw = encode_image(_used_card(ALGORITHMS[0]))
    assert encode_image(decode_image(raw, seeded(1))) == raw


def test_save_writes_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    sim = new_sim()
    sim.save(path)
    load(sim, 10)
    sim.save(path)  # replace an existing image
    assert sorted(os.listdir(tmp_path)) == ["card.json"]
    assert state_of(Sim.load(path)).balance == 1010


def test_a_failed_save_keeps_the_old_image_and_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "card.json"
    sim = new_sim()
    sim.save(path)
    old = path.read_bytes()
    load(sim, 10)

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("sim_applet.image.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        sim.save(path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["card.json"]


# --- refused images ------------------------------------------------------------------------------


def _value_offsets(raw: bytes, field: str) -> list[int]:
    """Offsets of the hex digits of a field's string value in the encoded image."""
    key = f'"{field}": "'.encode()
    start = raw.index(key) + len(key)
    end = raw.index(b'"', start)
    return list(range(start, end))


@pytest.mark.parametrize("field", ["public_data", "dpk", "pin", "sha256", "iccid"])
def test_a_changed_digit_is_refused_as_corrupted(field: str) -> None:
    raw = bytearray(encode_image(_used_card(ALGORITHMS[0])))
    for offset in _value_offsets(bytes(raw), field)[:8]:
        changed = bytearray(raw)
        changed[offset] = ord("1") if changed[offset] != ord("1") else ord("2")
        with pytest.raises(ImageError, match="corrupted"):
            decode_image(bytes(changed), seeded(1))


def test_every_single_bit_flip_anywhere_in_the_file_is_refused() -> None:
    raw = encode_image(new_sim())
    for offset in range(len(raw)):
        changed = bytearray(raw)
        changed[offset] ^= 0x01
        with pytest.raises(ImageError):
            decode_image(bytes(changed), seeded(1))


@pytest.mark.parametrize("cut", [1, 10, 100, -2])
def test_a_truncated_file_is_refused_as_not_json(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    new_sim().save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(ImageError, match="not JSON"):
        Sim.load(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2, 3]", "format is not"),
        (b'{"format": "some-other-image", "version": 1}', "format is not"),
        (json.dumps({"format": IMAGE_FORMAT, "version": 2}).encode(), "version 2 is not supported"),
        (json.dumps({"format": IMAGE_FORMAT}).encode(), "version None is not supported"),
        (json.dumps({"format": IMAGE_FORMAT, "version": IMAGE_VERSION}).encode(), "no 'sim'"),
    ],
    ids=["empty", "binary", "json-list", "other-format", "other-version", "no-version", "no-sim"],
)
def test_not_an_image_is_refused_with_a_clear_message(raw: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(raw, seeded(1))


def test_a_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read card image"):
        Sim.load(tmp_path / "absent.json")


def _edited(edit: Any) -> bytes:
    document = json.loads(encode_image(new_sim()))
    edit(document["sim"]["applications"][0])
    return _reseal(document)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda purse: purse.pop("balance"), r"applications\[0\]\.balance: missing"),
        (lambda purse: purse["keys"].pop("dtk"), r"keys\.dtk: missing"),
        (lambda purse: purse.update(public_data="00" * 29), "expected 30 bytes, got 29"),
        (lambda purse: purse["keys"].update(dpk="11" * 15), "expected 16 bytes, got 15"),
        (lambda purse: purse.update(log=["00" * 22]), r"log\[0\]: expected 23 bytes, got 22"),
        (lambda purse: purse.update(pin="12345"), "expected hex digits"),
        (lambda purse: purse.update(balance=-1), "expected an integer"),
        (lambda purse: purse.update(balance="100"), "expected an integer"),
        (lambda purse: purse.update(blocked=1), "expected true or false"),
        (lambda purse: purse["keys"].update(algorithm="aes"), "unknown algorithm"),
        (lambda purse: purse.update(kind="bank_card"), "unknown application kind"),
        (lambda purse: purse.update(proofs=[{"type": 6}]), r"proofs\[0\]\.ctc_after: missing"),
        (lambda purse: purse.update(public_data="AA" * 30), r"public_data: not BCD"),
        (lambda purse: purse.update(public_data="00" * 30), r"public_data: year 0"),
        (lambda purse: purse.update(capp_records=[]), "capp_records: expected 4 records"),
        (
            lambda purse: purse.update(capp_records=["", "", "", "00" * 49]),
            "of at most 48 bytes",
        ),
    ],
    ids=[
        "missing-balance",
        "missing-key",
        "short-public-data",
        "short-key",
        "short-log-record",
        "odd-hex",
        "negative-balance",
        "string-balance",
        "integer-flag",
        "unknown-algorithm",
        "unknown-kind",
        "proof-missing-field",
        "public-data-not-bcd",
        "public-data-no-date",
        "capp-records-missing",
        "capp-record-too-long",
    ],
)
def test_a_well_sealed_but_invalid_image_names_the_field(edit: Any, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(_edited(edit), seeded(1))


# --- driver cards and multi-application SIMs ------------------------------------------------------


def test_a_driver_card_image_round_trips_and_still_authenticates(tmp_path: Path) -> None:
    original = personalize_driver_card(DRIVER, random_source=seeded(3))
    path = tmp_path / "driver.json"
    original.save(path)
    loaded = Sim.load(path)
    assert sim_to_dict(loaded) == sim_to_dict(original)

    ok(loaded, select_by_aid(DRIVER_AID))
    assert DriverData.decode(ok(loaded, read_binary(SFI_PUBLIC))) == DRIVER
    challenge = bytes.fromhex("0102030405060708")
    cryptogram = ok(loaded, internal_authenticate(challenge))
    ok(new_psam(), verify_driver_card(DRIVER.serial, challenge, cryptogram))


def test_a_sim_with_a_purse_and_a_driver_card_round_trips() -> None:
    purse_sim = _used_card(ALGORITHMS[1])
    driver = personalize_driver_card(DRIVER).applications[0]
    assert isinstance(driver, DriverCard)
    both = Sim("89860000000000000420", [purse_of(purse_sim), driver], random_source=seeded(1))
    loaded = decode_image(encode_image(both), seeded(1))
    assert sim_to_dict(loaded) == sim_to_dict(both)
    assert [app.kind for app in loaded.applications] == ["transit_purse", "driver_card"]
