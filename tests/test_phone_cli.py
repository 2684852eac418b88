"""``app.py phone`` scripted, against the SMS centre and the bank as processes: a refusal
ends ``--until`` at once with its reason, the bank's refusal is one line, and a sub-menu
the SIM proposes is printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from reader_sim.bank import new_webhook_secret
from sim_applet.personalize import personalize
from tests.test_ota_e2e import _start, _wait_up
from tests.wallet_fixtures import ROOT, _free_port

PHONE, SHORT_CODE, MERCHANT, BANK_CARD = "13800138000", "10658888", "BUSCARD", "6222020000000001"
follow_s = 30
refused_within_s = 15  # well inside --follow: the phone did not wait it out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    env = {**os.environ, "BANK_WEBHOOK_SECRET": new_webhook_secret()}
    smsc_port, bank_port = _free_port(), _free_port()
    smsc, bank = f"http://127.0.0.1:{smsc_port}", f"http://127.0.0.1:{bank_port}"
    processes = [
        _start(["smsc", "serve", "--port", str(smsc_port)], env, tmp_path / "smsc.log"),
        _start(
            ["bank", "serve", "--port", str(bank_port), "--db", str(tmp_path / "bank.sqlite"),
             "--merchant", f"{MERCHANT}=http://127.0.0.1:{_free_port()}/hooks"],
            env,
            tmp_path / "bank.log",
        ),
    ]  # fmt: skip
    try:
        _wait_up(f"{smsc}/stats", processes[0], tmp_path / "smsc.log")
        _wait_up(f"{bank}/api/webhooks", processes[1], tmp_path / "bank.log")
        opened = requests.post(
            f"{bank}/api/cards",
            json={"number": BANK_CARD, "holder": "Li Lei", "balance_fen": 100},
            timeout=10,
        )
        assert opened.status_code == 201
        image = tmp_path / "phone.json"
        personalize(bytes.fromhex("20260000000000009001"), balance_fen=500).save(image)
        yield {"smsc": smsc, "bank": bank, "image": image}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=10)


def text_sms(world: dict, text: str) -> None:
    message = {"from": SHORT_CODE, "to": PHONE, "user_data": text.encode("utf-16-be").hex()}
    assert requests.post(f"{world['smsc']}/submit", json=message, timeout=10).status_code == 202


def phone(world: dict, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "phone", str(world["image"]), "--number", PHONE,
         "--smsc", world["smsc"], "--bank", world["bank"], *args],
        capture_output=True,
        text=True,
        timeout=follow_s + 30,
    )  # fmt: skip
    return result, time.monotonic() - started


def test_until_stops_at_a_refusal_sms_with_its_reason(world: dict) -> None:
    text_sms(world, "未受理 Refused: card 20260000000000009001 is lost")
    result, took = phone(world, "--follow", str(follow_s), "--until", "Top-up OK")
    assert took < refused_within_s, result.stdout
    assert result.returncode == 1
    assert result.stderr.startswith("Error: the platform refused: ")
    assert "card 20260000000000009001 is lost" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_refused_payment_is_one_line_and_stops_until(world: dict) -> None:
    text_sms(world, f"订单 Order T1, 30.00元: buspay://{MERCHANT}/T1/3000")
    result, took = phone(
        world, "--bank-card", BANK_CARD, "--follow", str(follow_s), "--until", "Top-up OK"
    )
    assert took < refused_within_s, result.stdout
    assert "[bank app: 30.00 yuan for T1 refused: insufficient funds]" in result.stdout
    assert "{" not in result.stdout  # no raw JSON
    assert result.returncode == 1
    assert result.stderr.startswith("Error: the bank refused the payment for T1: insufficient")


def test_without_until_a_refusal_is_shown_and_following_goes_on(world: dict) -> None:
    text_sms(world, "未受理 Refused: amount too large")
    result, _ = phone(world, "--follow", "1")
    assert result.returncode == 0, result.stderr
    assert "未受理 Refused: amount too large" in result.stdout


def test_select_7_prints_the_language_sub_menu(tmp_path: Path) -> None:
    image = tmp_path / "phone.json"
    personalize(bytes.fromhex("20260000000000009001")).save(image)
    down = f"http://127.0.0.1:{_free_port()}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "phone", str(image), "--smsc", down,
         "--bank", down, "--select", "7"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "语言 Language\n1. 中文\n2. English\nchoice? (back)" in result.stdout
    chosen = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "phone", str(image), "--smsc", down,
         "--bank", down, "--select", "7", "--input", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert "2. English\nchoice? 2\n[Language: English]" in chosen.stdout


def test_a_phone_given_no_sms_centre_url_says_so_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "phone.json"
    personalize(bytes.fromhex("20260000000000009001")).save(image)
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "phone", str(image), "--smsc", "127.0.0.1:8070",
         "--select", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not an http(s) origin" in result.stderr
