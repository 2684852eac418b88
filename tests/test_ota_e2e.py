"""The headline flow over real HTTP, every party its own process: the wallet service
(granian), the SMS centre, the bank, the OTA worker(s), and the phone (``app.py phone``,
scripted). The passenger picks "top up" on the SIM menu, the bank app pays the link in the
order SMS, the secured packets load the SIM, the phone shows the new balance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import requests

from reader_sim.bank import new_webhook_secret
from sim_applet.sim import Sim
from tests.helpers import wait_until_up
from tests.wallet_fixtures import ROOT, _free_port, cli_token
from wallet_service.worker import HttpBankClient

PHONE, BANK_CARD, MERCHANT, SHORT_CODE = "13800138000", "6222020000000009", "BUSCARD", "10658888"
SECRET = new_webhook_secret()
process_wait_s = 60


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _wait_up(url: str, process: subprocess.Popen, log: Path) -> None:
    if not wait_until_up(url, process_wait_s, process):
        pytest.fail(f"{url} did not come up: {log.read_text()[-2000:]}")


@pytest.fixture
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """Set before the service process starts (it reads WALLET_BANK_WEBHOOK_SECRET)."""
    monkeypatch.setenv("WALLET_BANK_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("BANK_WEBHOOK_SECRET", SECRET)
    return SECRET


SMSC_FAULTS = {
    "clean": [],
    # every SMS twice, 30 ms late: the SIM refuses the copies (counter), the platform
    # ignores stale PoRs; still loaded exactly once.
    "duplicated-and-delayed": ["--duplicate", "1.0", "--delay-ms", "30"],
}


@pytest.fixture(params=list(SMSC_FAULTS))
def smsc_faults(request: pytest.FixtureRequest) -> list[str]:
    return SMSC_FAULTS[request.param]


@pytest.fixture
def parties(  # type: ignore[no-untyped-def]
    webhook_secret: str, smsc_faults: list[str], service, tmp_path: Path
) -> Iterator[dict]:
    """SMS centre, bank and worker(s) around the ``service`` process (SQLite, then
    PostgreSQL — where two workers share the queue)."""
    base, env = service
    smsc_port, bank_port = _free_port(), _free_port()
    smsc, bank = f"http://127.0.0.1:{smsc_port}", f"http://127.0.0.1:{bank_port}"
    started = [
        (
            _start(
                ["smsc", "serve", "--port", str(smsc_port), *smsc_faults],
                env,
                tmp_path / "smsc.log",
            ),
            smsc,
        ),
        (
            _start(
                [
                    "bank", "serve", "--port", str(bank_port), "--db",
                    str(tmp_path / "bank.sqlite"), "--merchant",
                    f"{MERCHANT}={base}/api/v1/bank/webhooks",
                ],
                env,
                tmp_path / "bank.log",
            ),
            bank,
        ),
    ]  # fmt: skip
    for (process, url), name in zip(started, ("smsc", "bank"), strict=True):
        probe = f"{url}/stats" if url == smsc else f"{url}/api/webhooks"
        _wait_up(probe, process, tmp_path / f"{name}.log")
    # The service process is up: its worker(s) run against the same database.
    workers = 2 if env.get("DATABASE_URL", "").startswith("postgresql") else 1
    for number in range(workers):
        log = tmp_path / f"worker{number}.log"
        worker = ["worker", "--smsc", smsc, "--bank", bank, "--short-code", SHORT_CODE]
        started.append((_start(worker, env, log), ""))
    token = cli_token(env, "--role", "admin", "--label", "e2e")
    yield {"base": base, "env": env, "smsc": smsc, "bank": bank, "token": token, "tmp": tmp_path}
    for process, _ in started:
        process.send_signal(signal.SIGTERM)
    for process, _ in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _api(parties: dict, method: str, path: str, body: dict | None = None) -> dict:
    answer = requests.request(
        method,
        f"{parties['base']}/api/v1{path}",
        json=body,
        headers={"Authorization": f"Bearer {parties['token']}"},
        timeout=10,
    )
    assert answer.status_code < 300, answer.text
    return answer.json()


def _phone(parties: dict, image: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, str(ROOT / "app.py"), "phone", str(image),
            "--number", PHONE, "--smsc", parties["smsc"], "--bank", parties["bank"], *args,
        ],
        env=parties["env"],
        capture_output=True,
        text=True,
        timeout=process_wait_s,
    )  # fmt: skip


def test_top_up_from_the_phone_menu_across_processes(parties: dict) -> None:
    card = _api(parties, "POST", "/cards", {"iccid": "8986001234567890123", "phone": PHONE})
    _api(parties, "POST", f"/cards/{card['serial']}/activate")
    perso = Path(parties["env"]["WALLET_INSTANCE_DIR"]) / "personalization"
    image = parties["tmp"] / "phone-sim.json"
    image.write_bytes((perso / card["image_file"]).read_bytes())
    requests.post(
        f"{parties['bank']}/api/cards",
        json={"number": BANK_CARD, "holder": "Han Meimei", "balance_fen": 10_000},
        timeout=10,
    ).raise_for_status()

    topped_up = _phone(
        parties, image, "--select", "4", "--input", "30", "--input", "123456",
        "--bank-card", BANK_CARD, "--follow", "45", "--until", "Top-up OK",
    )  # fmt: skip
    assert topped_up.returncode == 0, topped_up.stdout + topped_up.stderr
    assert "请付款 Pay 30.00: buspay://BUSCARD/" in topped_up.stdout
    assert "bank app: 30.00 yuan" in topped_up.stdout and "paid" in topped_up.stdout
    assert "充值成功 Top-up OK 30.00, 余额 balance 30.00" in topped_up.stdout
    [order] = _api(parties, "GET", f"/cards/{card['serial']}/topups")["orders"]  # one order
    assert order["state"] == "loaded" and order["amount_fen"] == 3000 and order["tac"]

    balance = _phone(parties, image, "--select", "1")
    assert balance.returncode == 0 and "[余额：30.00元]" in balance.stdout
    sim = Sim.load(image)
    assert sim.application("transit_purse").state.balance == 3000  # type: ignore[attr-defined]
    ledger = _api(parties, "GET", "/ledger")
    assert ledger["balanced"]
    floats = {a["code"]: a["credits_fen"] - a["debits_fen"] for a in ledger["accounts"]}
    assert floats[f"card_float:{card['serial']}"] == 3000
    statement = HttpBankClient(parties["bank"], SECRET).statement(
        MERCHANT, date.fromisoformat(order["created_at"][:10])
    )
    report = _api(
        parties,
        "POST",
        f"/bank/reconciliation/{order['created_at'][:10]}",
        {"statement_csv": statement},
    )
    assert report["matched"] and report["loaded_fen"] == 3000, report


def test_the_phone_refuses_bad_arguments(tmp_path: Path) -> None:
    missing = subprocess.run(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "phone",
            str(tmp_path / "none.json"),
            "--select",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=process_wait_s,
        env=os.environ.copy(),
    )
    assert missing.returncode == 2 and "Error" in missing.stderr
