"""The three HTTP servers as their users start them — ``app.py serve`` (the wallet service),
``app.py smsc serve`` and ``app.py bank serve`` — served by granian
(``wallet_service.http_server``): they stop on a signal, leave no worker behind when killed
outright, and refuse a taken port in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from reader_sim.bank import new_webhook_secret
from tests.helpers import wait_until_up
from tests.wallet_fixtures import ROOT, _free_port

# server → (its command after app.py, the path that answers once it is up, what it says first)
SERVERS = {
    "service": (["serve"], "/health", "wallet service on {url} (OpenAPI: /openapi.json)"),
    "smsc": (["smsc", "serve"], "/stats", "SMS centre on {url}"),
    "bank": (["bank", "serve"], "/api/webhooks", "bank on {url}"),
}


def _command(server: str, port: int, tmp_path: Path, *options: str) -> list[str]:
    args, _, _ = SERVERS[server]
    extra = ["--db", str(tmp_path / "bank.sqlite")] if server == "bank" else []
    return [sys.executable, str(ROOT / "app.py"), *args, "--port", str(port), *extra, *options]


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "WALLET_INSTANCE_DIR": str(tmp_path / "instance"),  # (the service: SQLite in it)
        "BANK_WEBHOOK_SECRET": new_webhook_secret(),
    }


@contextmanager
def _served(
    server: str, tmp_path: Path, *options: str, output: Any = subprocess.PIPE
) -> Iterator[tuple[subprocess.Popen, int]]:
    port = _free_port()
    process = subprocess.Popen(
        _command(server, port, tmp_path, *options),
        env=_env(tmp_path),
        stdout=output,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}{SERVERS[server][1]}", 30, process)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    "stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda stop: stop.name
)
def test_a_signal_ends_the_server_and_its_workers(
    server: str, stop: signal.Signals, tmp_path: Path
) -> None:
    """(SIGHUP too: granian's own reload, restarting workers one by one, left a server
    serving when a SIGTERM came meanwhile; the SMS centre's mailboxes live in its one
    worker besides.)"""
    with _served(server, tmp_path, "--host", "localhost") as (process, port):
        workers = _children(process.pid)
        assert workers, "served from worker processes"
        process.send_signal(stop)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    url = f"http://127.0.0.1:{port}"
    assert output.splitlines()[0] == SERVERS[server][2].format(url=url)
    assert not any(map(_running, workers))
    _assert_free(port)


@pytest.mark.parametrize("server", SERVERS)
def test_a_server_killed_outright_leaves_no_worker_holding_its_port(
    server: str, tmp_path: Path
) -> None:
    """Each worker ends with the process that started it, however that ends."""
    workers: list[str] = []
    try:
        with _served(server, tmp_path) as (process, port):
            workers = _children(process.pid)
            assert workers, "served from worker processes"
            process.kill()
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, workers))
    finally:
        for pid in filter(_running, workers):  # (the bug this guards: not left behind)
            os.kill(int(pid), signal.SIGKILL)
    _assert_free(port)


@pytest.mark.parametrize("server", SERVERS)
def test_a_taken_port_is_refused_in_one_line(server: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            _command(server, port, tmp_path),
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_the_service_logs_each_request_it_answers(tmp_path: Path) -> None:
    """(granian logs a request after its answer has gone: a stop that comes between the
    two loses the line — seen once, the signal sent as the answer came. So the test
    waits for the line, up to 5 s, before it stops the service.)"""
    log = tmp_path / "stdout.log"
    with (
        log.open("w") as output,
        _served("service", tmp_path, "--workers", "2", "--threads", "4", output=output) as (
            process,
            port,
        ),
    ):
        assert len(_children(process.pid)) == 2
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/nowhere", timeout=5).status_code == 404
        deadline = time.monotonic() + 5
        while "/api/v1/nowhere" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    logged = [line for line in log.read_text().splitlines() if "/api/v1/nowhere" in line]
    assert len(logged) == 1 and '"GET /api/v1/nowhere HTTP/1.1" 404' in logged[0]


@pytest.mark.parametrize("ending", ["SIGTERM", "killed outright"])
def test_the_bank_ends_at_once_with_webhooks_stalled_in_flight(ending: str, tmp_path: Path) -> None:
    """A merchant that never answers: twenty callbacks, eight posted at a time, each
    waiting out its timeout (5 s). The bank's posting threads end with its worker, not
    after every queued post (a ThreadPoolExecutor's are joined at exit: the worker stayed
    up past granian's kill timeout, or, its parent killed, for half a minute)."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as stalled:  # (never answers)
        merchant = f"STALL=http://127.0.0.1:{stalled.getsockname()[1]}/callbacks"
        with _served("bank", tmp_path, "--merchant", merchant) as (process, port):
            bank = f"http://127.0.0.1:{port}/api"
            card = {"number": "6222020000000009", "holder": "Li", "balance_fen": 10_000}
            requests.post(f"{bank}/cards", json=card, timeout=5).raise_for_status()
            for n in range(20):
                payment = {"merchant": "STALL", "order_id": f"o{n}", "amount_fen": 1}
                payment["card_number"] = card["number"]
                requests.post(f"{bank}/payments", json=payment, timeout=5).raise_for_status()
            time.sleep(0.5)  # (the sender is posting)
            workers = _children(process.pid)
            started = time.monotonic()
            if ending == "SIGTERM":
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=15)
            else:
                process.kill()
            while any(map(_running, workers)) and time.monotonic() - started < 15:
                time.sleep(0.05)
            assert time.monotonic() - started < 3  # (granian's kill timeout: 5 s)
    _assert_free(port)


def test_a_worker_takes_its_settings_and_any_http_variable_out_of_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """granian copies the environment into every request's WSGI environ: the settings (the
    bank's secret among them) would ride along, and HTTP_PROXY would read as a Proxy
    header on a request that sent none."""
    from wallet_service import http_server

    monkeypatch.setenv(http_server._SETTINGS_VARIABLE, '{"settings": {"secret": "s"}}')
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid")
    monkeypatch.setenv("HTTPS_PROXY_NOT_A_HEADER", "kept")  # (HTTPS_…: no header)
    assert http_server._taken_from_the_environment() == {"settings": {"secret": "s"}}
    assert http_server._SETTINGS_VARIABLE not in os.environ
    assert "HTTP_PROXY" not in os.environ and "HTTPS_PROXY_NOT_A_HEADER" in os.environ


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _running(pid: str) -> bool:
    """(A process ended but not reaped yet — a zombie, its parent gone — is not running.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _assert_free(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)):
        pass
