"""The testers' command line, run as testers run it: ``python app.py …`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reader_sim.bank import new_webhook_secret

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def card_image(tmp_path: Path) -> Path:
    image = tmp_path / "phone.json"
    result = run("card", "new", str(image), "--serial", "20260000000000000042", "--balance", "1000")
    assert result.returncode == 0, result.stderr
    return image


@pytest.fixture
def pos_file(tmp_path: Path) -> Path:
    path = tmp_path / "pos.json"
    path.write_text(
        json.dumps(
            {
                "operator": "BUS-CO-1",
                "route": "12",
                "vehicle": "V-1201",
                "fare_fen": 200,
                "terminal_id": "000012000001",
                "record_store": "records.sqlite",
            }
        )
    )
    return path


def show(image: Path) -> dict:
    result = run("card", "show", str(image), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["applications"][0]


def test_card_new_then_show_reports_the_serial_balance_and_counters(card_image: Path) -> None:
    purse = show(card_image)
    assert purse["serial"] == "20260000000000000042"
    assert (purse["balance_fen"], purse["online_ctc"], purse["offline_ctc"]) == (1000, 0, 0)
    text = run("card", "show", str(card_image)).stdout
    assert "10.00 yuan" in text


def test_card_new_with_sm4_and_a_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                name: "0123456789ABCDEFFEDCBA9876543210"
                for name in ("load", "purchase", "tac", "maintenance", "pin_unblock")
            }
        )
    )
    image = tmp_path / "sm4.json"
    result = run("card", "new", str(image), "--algorithm", "sm4", "--keys", str(keys))
    assert result.returncode == 0, result.stderr
    assert show(image)["algorithm"] == "sm4"
    loaded = run("card", "load", str(image), "500", "--keys", str(keys))
    assert loaded.returncode == 0, loaded.stderr
    refused = run("card", "load", str(image), "500")  # demo keys: MAC1 does not verify
    assert refused.returncode == 1 and "MAC1" in refused.stderr
    assert show(image)["balance_fen"] == 500


def test_card_script_runs_apdus_and_stops_at_the_first_mismatch(
    card_image: Path, tmp_path: Path
) -> None:
    script = tmp_path / "balance.apdu"
    script.write_text(
        "# select, then balance\n"
        "00 A4 04 00 08 A0 00 00 06 32 01 01 05 00\n"
        "805C000204 000003E89000\n"
        "80 50 01 02 0B 01 00 00 00 01 00 00 00 00 00 01 0F"
        " -> 000003E8 0000 000000 01 00 XXXXXXXX 9000\n"
        "805C000204 000000009000\n"
        "805C000204 000003E89000\n"
    )
    result = run("card", "script", str(card_image), str(script))
    assert result.returncode == 1
    assert "balance.apdu:5: expected 00 00 00 00 90 00, got 00 00 03 E8 90 00" in result.stderr
    assert result.stdout.count("> ") == 4  # the fifth line never ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["card", "new", "{tmp}/x.json", "--serial", "1234"], "--serial must be 20 hex digits"),
        (["card", "new", "{tmp}/x.json", "--algorithm", "aes"], "Invalid value"),
        (["card", "new", "{tmp}/x.json", "--keys", "{tmp}/missing.json"], "cannot read key file"),
        (["card", "show", "{tmp}/missing.json"], "cannot read card image"),
        (["card", "load", "{image}", "0"], "Invalid value"),
        (["card", "script", "{image}", "{tmp}/missing.apdu"], "cannot read"),
        (["pos", "tap", "{image}", "--pos", "{tmp}/missing.json"], "cannot read POS file"),
        (["card", "new", "{image}"], "exists"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message_and_change_nothing(
    card_image: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    before = card_image.read_bytes()
    argv = [a.format(tmp=tmp_path, image=card_image) for a in args]
    result = run(*argv)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert card_image.read_bytes() == before
    assert not (tmp_path / "x.json").exists()


def test_a_corrupted_image_is_refused(card_image: Path) -> None:
    text = card_image.read_text().replace('"balance": 1000', '"balance": 9000')
    card_image.write_text(text)
    result = run("card", "show", str(card_image))
    assert result.returncode == 2 and "corrupted" in result.stderr


def test_a_bad_script_line_is_refused_before_anything_runs(
    card_image: Path, tmp_path: Path
) -> None:
    script = tmp_path / "bad.apdu"
    script.write_text("80 5C 00 02 04\nnot hex at all\n")
    result = run("card", "script", str(card_image), str(script))
    assert result.returncode == 2 and "line 2" in result.stderr
    assert result.stdout == ""


def test_pos_tap_needs_a_driver_then_charges_and_records(
    card_image: Path, pos_file: Path, tmp_path: Path
) -> None:
    refused = run("pos", "tap", str(card_image), "--pos", str(pos_file))
    assert refused.returncode == 1 and "no driver signed in" in refused.stdout

    driver = tmp_path / "driver.json"
    issued = run(
        "card",
        "new-driver",
        str(driver),
        "--driver-id",
        "D007",
        "--name",
        "Wang Wei",
        "--operator",
        "BUS-CO-1",
    )
    assert issued.returncode == 0, issued.stderr
    signed = run("pos", "tap", str(driver), "--pos", str(pos_file))
    assert signed.returncode == 0 and "driver signed in" in signed.stdout

    paid = run("pos", "tap", str(card_image), "--pos", str(pos_file), "--at", "2026-11-25 08:00:00")
    assert paid.returncode == 0, paid.stdout + paid.stderr
    record = json.loads(paid.stdout.splitlines()[1])
    assert record["amount"] == 200 and record["driver"] == "D007"
    assert record["card_serial"] == "20260000000000000042"
    assert show(card_image)["balance_fen"] == 800

    at = "2026-11-25 08:00:05"
    again = run("pos", "tap", str(card_image), "--pos", str(pos_file), "--at", at)
    assert again.returncode == 0 and "already paid" in again.stdout
    records = run("pos", "records", "--pos", str(pos_file)).stdout.splitlines()
    assert len(records) == 1 and json.loads(records[0]) == record


def test_ota_keys_encode_and_a_packet_handed_to_the_sim(card_image: Path) -> None:
    from otar.packets import OtaKeyset, PorStatus, Spi, decode_por
    from otar.remote_apdu import CompactResponse

    keys = json.loads(run("card", "ota-keys", str(card_image)).stdout)
    assert (keys["tar"], keys["cntr"], keys["algo_crypt"]) == ("425553", 0, "aes_cbc")
    packet = run(
        "ota", "encode", str(card_image), "00A4040008A00000063201010500", "805C000204"
    ).stdout.strip()
    answer = run("card", "ota", str(card_image), packet)
    assert answer.returncode == 0, answer.stderr
    keyset = OtaKeyset(
        keys["algo_crypt"],
        keys["kic_idx"],
        bytes.fromhex(keys["kic"]),
        keys["algo_auth"],
        keys["kid_idx"],
        bytes.fromhex(keys["kid"]),
    )
    por = decode_por(keyset, Spi(), bytes.fromhex(answer.stdout.strip()))
    balance = CompactResponse.decode(por.data)
    assert (por.status, balance.last_sw, balance.last_data) == (
        PorStatus.OK,
        0x9000,
        (1000).to_bytes(4, "big"),
    )
    assert json.loads(run("card", "ota-keys", str(card_image)).stdout)["cntr"] == 1
    replay = run("card", "ota", str(card_image), packet)
    assert replay.stdout.strip().endswith("02")  # PoR status: counter low, nothing ran
    assert run("card", "ota", str(card_image), "zz").returncode == 2


def _worker_on_sqlite(
    tmp_path: Path, *options: str, bank_secret: bool = True
) -> subprocess.CompletedProcess:
    """``app.py worker`` on an SQLite database in ``tmp_path`` (with a bank secret, or
    none at all)."""
    import os

    unset = ("DATABASE_URL",) if bank_secret else ("DATABASE_URL", "SECRET")
    env = {k: v for k, v in os.environ.items() if not any(part in k for part in unset)}
    env["WALLET_INSTANCE_DIR"] = str(tmp_path)
    if bank_secret:
        env["WALLET_BANK_WEBHOOK_SECRET"] = new_webhook_secret()
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "worker", *options],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_worker_without_the_bank_secret_says_refunds_wait(tmp_path: Path) -> None:
    """(The bank takes signed refund requests only.)"""
    result = _worker_on_sqlite(
        tmp_path, "--once", "--smsc", "http://127.0.0.1:9", bank_secret=False
    )
    assert result.stderr.splitlines()[0] == (
        "worker: no WALLET_BANK_WEBHOOK_SECRET: refunds wait until it is set"
    )


def test_a_worker_pass_with_the_sms_centre_down_says_so_in_one_line(tmp_path: Path) -> None:

    from tests.wallet_fixtures import _free_port

    down = f"http://127.0.0.1:{_free_port()}"
    result = _worker_on_sqlite(tmp_path, "--once", "--smsc", down, "--bank", down)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: pass not done:") and "Traceback" not in result.stderr


UPGRADE, TOKEN = ("db", "upgrade"), ("admin", "create-token", "--role", "admin")


@pytest.mark.parametrize(
    ("command", "setting", "says"),
    [
        (TOKEN, {"WALLET_KEY_FILE": "/nonexistent/keys.json"}, "cannot read key file"),
        (UPGRADE, {"DATABASE_URL": "not a url:secret"}, "DATABASE_URL is not a database URL"),
        (UPGRADE, {"DATABASE_URL": "postgresql+psycopg://127.0.0.1:1/x"}, "the database is"),
    ],
)
def test_an_operators_setup_mistake_is_one_line_and_exit_1(
    tmp_path: Path, command: tuple[str, ...], setting: dict[str, str], says: str
) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WALLET_KEY_FILE")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "WALLET_INSTANCE_DIR": str(tmp_path), **setting},
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {says}") and result.stderr.count("\n") == 1
    assert "secret" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "refusal"),
    [
        ("--smsc", "127.0.0.1:8070", "not an http(s) origin"),
        ("--smsc", "ftp://127.0.0.1", "not an http(s) origin"),
        ("--short-code", "1065 8888", "not an MSISDN"),
    ],
)
def test_a_worker_given_no_sms_centre_url_or_no_short_code_says_so_and_stops(
    tmp_path: Path, option: str, value: str, refusal: str
) -> None:
    """(Else every pass would fail the same way, logged, for ever.)"""
    result = _worker_on_sqlite(tmp_path, option, value)
    assert result.returncode == 2
    assert refusal in result.stderr.splitlines()[-1]
    assert not (tmp_path / "wallet.sqlite").exists()  # refused before the database
