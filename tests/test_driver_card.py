"""The driver card application (sim_applet/driver_card.py, project-defined) and a SIM
hosting several applications selected by AID (card-application.md §1)."""

from __future__ import annotations

from datetime import date

import pytest

from reader_sim.psam import verify_driver_card
from sim_applet.apdu import SW, CommandApdu
from sim_applet.driver_card import (
    DRIVER_AID,
    DriverCard,
    DriverData,
    driver_data_bytes,
    internal_authenticate,
)
from sim_applet.personalize import personalize_driver_card
from sim_applet.sim import Sim
from sim_applet.structures import (
    GET_BALANCE,
    SFI_PUBLIC,
    TRANSIT_AID,
    InitializeRequest,
    initialize_for_purchase,
    read_binary,
    select_by_aid,
)
from tests.card_helpers import (
    POS_TERMINAL_ID,
    new_psam,
    new_sim,
    ok,
    prepare_purchase,
    purse_of,
    seeded,
    send,
    snapshot,
    sw_of,
)

DRIVER = DriverData(
    bytes.fromhex("D0000000000000000007"), "D007", "BUS-CO-1", "F1", "Wang Wei", date(2036, 12, 31)
)
CHALLENGE = bytes.fromhex("0011223344556677")


def _driver_sim(master_key: bytes | None = None) -> Sim:
    options = {} if master_key is None else {"driver_master_key": master_key}
    sim = personalize_driver_card(DRIVER, random_source=seeded(3), **options)
    ok(sim, select_by_aid(DRIVER_AID))
    return sim


@pytest.mark.parametrize(
    "driver",
    [
        DRIVER,
        DriverData(bytes(10), "", "", "", "", date(2030, 1, 1)),
        DriverData(
            bytes(range(10)), "D123456789", "OPERATOR", "FLEET-07", "王伟", date(2099, 12, 31)
        ),
        DriverData(bytes(10), "X", "Y", "Z", "n" * 24, date(2026, 2, 28)),
    ],
    ids=["demo", "empty-texts", "full-width-fields", "longest-name"],
)
def test_driver_data_round_trips_in_64_bytes(driver: DriverData) -> None:
    encoded = driver.encode()
    assert len(encoded) == driver_data_bytes
    assert DriverData.decode(encoded) == driver


@pytest.mark.parametrize(
    "driver",
    [
        DriverData(bytes(10), "D1234567890", "", "", "", date(2030, 1, 1)),
        DriverData(bytes(10), "", "", "", "王" * 9, date(2030, 1, 1)),  # 27 bytes of UTF-8
    ],
    ids=["driver-id-11-chars", "name-27-bytes"],
)
def test_driver_data_refuses_fields_that_do_not_fit(driver: DriverData) -> None:
    with pytest.raises(ValueError, match="longer than"):
        driver.encode()


def test_driver_data_decode_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 64"):
        DriverData.decode(DRIVER.encode()[:-1])


def test_select_driver_card_answers_fci_with_its_aid() -> None:
    sim = personalize_driver_card(DRIVER, random_source=seeded(3))
    fci, sw = send(sim, select_by_aid(DRIVER_AID))
    assert sw == SW.OK
    assert fci == bytes((0x6F, 10, 0x84, 8)) + DRIVER_AID


def test_read_binary_answers_the_64_byte_driver_file() -> None:
    sim = _driver_sim()
    assert DriverData.decode(ok(sim, read_binary(SFI_PUBLIC))) == DRIVER
    assert ok(sim, read_binary(SFI_PUBLIC, 10, 10)) == b"D007      "


def test_internal_authenticate_is_verified_by_the_psam() -> None:
    sim = _driver_sim()
    cryptogram = ok(sim, internal_authenticate(CHALLENGE))
    assert len(cryptogram) == 8
    assert send(new_psam(), verify_driver_card(DRIVER.serial, CHALLENGE, cryptogram)) == (
        b"",
        SW.OK,
    )


def test_a_tampered_cryptogram_answers_9302() -> None:
    sim = _driver_sim()
    cryptogram = bytearray(ok(sim, internal_authenticate(CHALLENGE)))
    cryptogram[7] ^= 0x01
    command = verify_driver_card(DRIVER.serial, CHALLENGE, bytes(cryptogram))
    assert sw_of(new_psam(), command) == SW.MAC_INVALID


def test_a_copied_driver_file_on_another_key_does_not_sign_in() -> None:
    sim = _driver_sim(master_key=bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    assert ok(sim, read_binary(SFI_PUBLIC)) == DRIVER.encode()  # same file
    cryptogram = ok(sim, internal_authenticate(CHALLENGE))
    command = verify_driver_card(DRIVER.serial, CHALLENGE, cryptogram)
    assert sw_of(new_psam(), command) == SW.MAC_INVALID


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        (CommandApdu(0x00, 0x88, 0x00, 0x00, bytes(7), 8), SW.WRONG_LENGTH),
        (CommandApdu(0x00, 0x88, 0x01, 0x00, CHALLENGE, 8), SW.WRONG_P1_P2),
        (CommandApdu(0x80, 0x88, 0x00, 0x00, CHALLENGE, 8), SW.CLA_NOT_SUPPORTED),
        (CommandApdu(0x80, 0xB0, 0x95, 0x00, le=256), SW.CLA_NOT_SUPPORTED),
        (CommandApdu(0x00, 0xB0, 0x96, 0x00, le=256), SW.FILE_NOT_FOUND),
        (GET_BALANCE, SW.INS_NOT_SUPPORTED),
        (CommandApdu(0x00, 0xB0, 0x95, 0x00, le=65), SW.wrong_le(64)),
    ],
    ids=["challenge-7", "p1", "cla-80-auth", "cla-80-read", "sfi-16", "get-balance", "le-65"],
)
def test_driver_card_refuses_with_the_exact_status_word(command: CommandApdu, sw: int) -> None:
    sim = _driver_sim()
    assert send(sim, command) == (b"", sw)


# --- one SIM, two applications -------------------------------------------------------------------


def _two_application_sim() -> Sim:
    purse_sim = new_sim(balance_fen=800, select=False)
    driver = personalize_driver_card(DRIVER).applications[0]
    assert isinstance(driver, DriverCard)
    return Sim("89860000000000000420", [purse_of(purse_sim), driver], random_source=seeded(1))


def test_selection_by_aid_picks_the_application() -> None:
    sim = _two_application_sim()
    ok(sim, select_by_aid(DRIVER_AID))
    assert DriverData.decode(ok(sim, read_binary(SFI_PUBLIC))) == DRIVER
    assert sw_of(sim, GET_BALANCE) == SW.INS_NOT_SUPPORTED
    ok(sim, select_by_aid(TRANSIT_AID))
    assert ok(sim, GET_BALANCE) == (800).to_bytes(4, "big")
    assert len(ok(sim, read_binary(SFI_PUBLIC))) == 30


def test_selecting_another_application_cancels_the_pending_purchase() -> None:
    sim = _two_application_sim()
    ok(sim, select_by_aid(TRANSIT_AID))
    prepared = prepare_purchase(sim, new_psam(), 100)
    before = snapshot(sim)
    ok(sim, select_by_aid(DRIVER_AID))
    ok(sim, select_by_aid(TRANSIT_AID))
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == before


def test_driver_commands_do_not_touch_the_purse() -> None:
    sim = _two_application_sim()
    before = snapshot(sim)
    ok(sim, select_by_aid(DRIVER_AID))
    ok(sim, internal_authenticate(CHALLENGE))
    sim.transmit(initialize_for_purchase(InitializeRequest(1, 100, POS_TERMINAL_ID)).encode())
    assert snapshot(sim) == before
