"""The Standard Webhooks secret shared by the bank and the platform: a secret the webhook
library cannot use stops both at start, in one line; the bank's sender outlives a failing
pass."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reader_sim.bank import new_webhook_secret, webhook_key
from reader_sim.bank_http import WebhookSender
from tests.wallet_fixtures import _free_port
from wallet_service import create_app
from wallet_service.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
NOT_SECRETS = [
    "whsec_not base64!!",  # the library fails on it only when it signs or verifies
    "whsec_",  # no key
    "whsec_YW-_",  # URL-safe letters: the library drops them and signs with another key
    "whsec_abcde",  # 5 base64 digits: not whole bytes
    "c2VjcmV0c2VjcmV0c2VjcmV0",  # no whsec_ prefix
]
SECRET_ENV = "WALLET_BANK_WEBHOOK_SECRET"


def app_py(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``app.py`` that must stop by itself; one that serves instead runs into the timeout."""
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )


def test_webhook_keys_are_whsec_and_strict_base64() -> None:
    assert webhook_key("whsec_YWJjZA==") == webhook_key("whsec_YWJjZA") == b"abcd"
    secret = new_webhook_secret()
    assert len(webhook_key(secret)) == 24
    for bad in NOT_SECRETS:
        with pytest.raises(ValueError, match="whsec_") as refused:
            webhook_key(bad)
        assert bad.removeprefix("whsec_") not in str(refused.value) or bad == "whsec_"


@pytest.mark.parametrize("secret", NOT_SECRETS)
def test_bank_serve_refuses_a_secret_it_could_not_sign_with(tmp_path: Path, secret: str) -> None:
    result = app_py(
        "bank",
        "serve",
        "--port",
        str(_free_port()),
        "--db",
        str(tmp_path / "bank.sqlite"),
        "--secret",
        secret,
        env=dict(os.environ),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: --secret") and result.stderr.count("\n") == 1
    assert "whsec_" in result.stderr and "Traceback" not in result.stderr


def test_the_wallet_service_refuses_a_bad_webhook_secret_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"WALLET_INSTANCE_DIR": str(tmp_path), SECRET_ENV: "whsec_hunter2!!"})
    for command in (("serve", "--port", str(_free_port()), "--no-migrate"), ("worker", "--once")):
        result = app_py(*command, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(f"Error: {SECRET_ENV}") and result.stderr.count("\n") == 1
        assert "hunter2" not in result.stderr  # a secret is never echoed


def test_create_app_refuses_a_bad_webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "whsec_YW-_")
    with pytest.raises(ConfigurationError, match=SECRET_ENV):
        create_app({"TESTING": True, "SECRET_KEY": "test"})
    monkeypatch.setenv(SECRET_ENV, "")  # empty: no secret, webhooks refused as before
    assert create_app({"TESTING": True, "SECRET_KEY": "test"}).config["BANK_WEBHOOK_SECRET"] == ""


class FailingOnceBank:
    """A bank whose first pass fails unexpectedly; the second one is counted."""

    def __init__(self) -> None:
        self.passes = 0
        self.second_pass = threading.Event()

    def due_webhooks(self) -> list[tuple[str, str, str, str]]:
        self.passes += 1
        if self.passes == 1:
            raise RuntimeError("database is locked")
        self.second_pass.set()
        return []


def test_the_webhook_sender_logs_an_unexpected_error_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bank = FailingOnceBank()
    sender = WebhookSender(bank, new_webhook_secret())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="reader_sim.bank_http"):
        sender.thread.start()
        sender.wake()
        try:
            assert bank.second_pass.wait(10), "the sender stopped after the failing pass"
            assert sender.thread.is_alive()
        finally:
            sender.stop.set()
            sender.wake()
            sender.thread.join(timeout=5)
    assert any("database is locked" in record.getMessage() for record in caplog.records)
