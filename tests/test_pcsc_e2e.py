"""The card over the real PC/SC stack: pyscard → pcscd → vpcd → TCP → the card model, and
the testers' own tools (scriptor, opensc-tool) driving it like a physical card."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reader_sim.link import CardRemoved
from reader_sim.load_terminal import Loaded, LoadTerminal
from reader_sim.pcscd_process import PcscDaemon, pcscd_running
from reader_sim.pos import Outcome
from sim_applet.personalize import DEMO_ISSUER_KEYS
from sim_applet.sim import Sim
from tests.helpers import COUNTER_TERMINAL_ID, FARE_FEN, Clock, new_card, new_pos, purse
from tests.pcsc_support import wait_until

pytestmark = pytest.mark.pcsc
ROOT = Path(__file__).resolve().parent.parent
SELECT = "00A4040008A00000063201010500"


def test_pyscard_sees_the_atr_and_the_card_answers_byte_exact(insert_card) -> None:  # type: ignore[no-untyped-def]
    card = new_card(balance_fen=1000)
    link = insert_card(card)
    assert link.atr == card.atr
    assert link.transmit(bytes.fromhex(SELECT))[-2:] == b"\x90\x00"
    assert link.transmit(bytes.fromhex("805C000204")) == bytes.fromhex("000003E89000")
    assert link.transmit(bytes.fromhex("80CA000000")) == bytes.fromhex("6D00")


def test_a_load_and_a_bus_tap_over_pcsc(insert_card) -> None:  # type: ignore[no-untyped-def]
    card = new_card()
    link = insert_card(card)
    loaded = LoadTerminal(DEMO_ISSUER_KEYS, COUNTER_TERMINAL_ID, Clock()).load(link, 1000)
    assert isinstance(loaded, Loaded)
    outcome = new_pos().present(link)
    assert outcome.outcome is Outcome.PAID and purse(card).balance == 1000 - FARE_FEN


def test_a_phone_torn_away_mid_payment_is_charged_once_when_it_comes_back(insert_card) -> None:  # type: ignore[no-untyped-def]
    card = new_card(balance_fen=1000)
    link = insert_card(card)
    pos = new_pos()
    card.cut_power_after(7, during_ins=0x54)  # after the card committed the debit
    assert pos.present(link).outcome is Outcome.CARD_REMOVED
    with pytest.raises(CardRemoved):
        link.transmit(bytes.fromhex("805C000204"))
    card.power_on()
    link = insert_card(card)  # tapped again: a new connection, as after any removal
    again = pos.present(link)
    assert again.outcome is Outcome.RECOVERED
    assert purse(card).balance == 1000 - FARE_FEN and len(pos.store.records()) == 1


def test_a_card_goes_in_after_pcscd_went_away(insert_card, pcsc_daemon) -> None:  # type: ignore[no-untyped-def]
    """The session's pcscd can be another program's, stopped under the suite's feet: here
    the suite's own stands in for it. (Another program's — a workstation's, serving real
    readers — is not this suite's to stop: then only the insertion is checked.)"""
    if pcsc_daemon.process is not None:
        pcsc_daemon.stop()
        wait_until(lambda: not pcscd_running(), "pcscd has gone")
    link = insert_card(new_card(balance_fen=1000))
    assert link.transmit(bytes.fromhex(SELECT))[-2:] == b"\x90\x00"
    assert link.transmit(bytes.fromhex("805C000204")) == bytes.fromhex("000003E89000")


def test_scriptor_drives_the_card(insert_card, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    insert_card(new_card(balance_fen=1000))
    script = tmp_path / "balance.apdu"
    script.write_text("00 A4 04 00 08 A0 00 00 06 32 01 01 05 00\n80 5C 00 02 04\n")
    result = subprocess.run(
        ["scriptor", "-r", "Virtual PCD 00 00", str(script)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "00 00 03 E8 90 00" in result.stdout.upper()


def test_opensc_tool_drives_the_card(insert_card) -> None:  # type: ignore[no-untyped-def]
    insert_card(new_card(balance_fen=1000))
    result = subprocess.run(
        ["opensc-tool", "-r", "0", "-c", "default", "-s", SELECT, "-s", "805C000204"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "00 00 03 E8" in result.stdout.upper() and "SW1=0X90, SW2=0X00" in result.stdout.upper()


def test_card_serve_inserts_an_image_and_saves_what_the_card_does(
    pcsc_daemon: PcscDaemon, tmp_path: Path
) -> None:
    from reader_sim.pcsc_link import PcscLink, card_present

    pcsc_daemon.start()  # back, if another program's pcscd went away
    image = tmp_path / "phone.json"
    new_card().save(image)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "card", "serve", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(card_present, "the served card is in the reader")
        link = PcscLink.open()
        loaded = LoadTerminal(DEMO_ISSUER_KEYS, COUNTER_TERMINAL_ID, Clock()).load(link, 777)
        assert isinstance(loaded, Loaded)
        link.close()
        wait_until(lambda: purse(Sim.load(image)).balance == 777, "the image is saved")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    wait_until(lambda: not card_present(), "the reader is empty")
    assert purse(Sim.load(image)).balance == 777


def test_card_serve_refuses_a_bad_image(pcsc_daemon: None, tmp_path: Path) -> None:
    image = tmp_path / "bad.json"
    image.write_text("{}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "card", "serve", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 2 and "not a card image" in result.stderr
