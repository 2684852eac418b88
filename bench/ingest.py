"""ingest_records_per_s: tap records through the HTTP API in batches of 500, on PostgreSQL,
served by ``app.py serve`` (granian, a request at a time a worker): what a bus fleet sends."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import requests

from bench.scratch import free_port, scratch_database
from tests.helpers import wait_until_up

ROOT = Path(__file__).resolve().parent.parent
batch_records = 500
batches_per_round = 40
rounds = 3
client_threads = 4
server_workers = 2
startup_timeout_s = 30


def _records(terminal_id: str, first_seq: int, count: int) -> list[dict]:
    start = datetime(2026, 11, 25, 6, 0, 0)
    return [
        {
            "terminal_id": terminal_id,
            "terminal_seq": seq,
            "card_serial": f"{seq % 5000:020X}",
            "ctc": seq % 60000,
            "amount": 200,
            "balance_before": 10000,
            "balance_after": 9800,
            "transaction_type": 6,
            "occurred_at": (start + timedelta(seconds=seq)).isoformat(),
            "tac": "A1B2C3D4",
            "mac2": "01020304",
            "mac2_verified": True,
            "key_version": 1,
            "algorithm": 0,
            "operator": "BUS1",
            "route": "12",
            "vehicle": "V1",
            "driver": "D007",
            "recovered": False,
        }
        for seq in range(first_seq, first_seq + count)
    ]


def _start_service(env: dict, port: int, *options: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(server_workers),
            *options,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if wait_until_up(f"http://127.0.0.1:{port}/health", startup_timeout_s, process):
        return process
    process.kill()
    raise RuntimeError("the service did not start")


def _token(env: dict, *args: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "admin", "create-token", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def ingest_figures() -> dict[str, float]:
    with scratch_database("wallet_bench") as database:
        return _ingest_figures(database.name, database.url)


def _ingest_figures(name: str, url: str) -> dict[str, float]:
    port = free_port()
    instance = Path(f"/tmp/{name}")
    env = {**os.environ, "DATABASE_URL": url, "WALLET_INSTANCE_DIR": str(instance)}
    process = _start_service(env, port)
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        session = requests.Session()
        admin = {"Authorization": f"Bearer {_token(env, '--role', 'admin')}"}
        session.post(f"{base}/operators", json={"code": "BUS1", "name": "B"}, headers=admin)
        for path, body in [
            ("fleets", {"code": "F1", "name": "F"}),
            ("routes", {"code": "12", "name": "R", "fare_fen": 200}),
            ("vehicles", {"code": "V1", "plate": "P", "fleet": "F1", "route": "12"}),
        ]:
            session.post(f"{base}/operators/BUS1/{path}", json=body, headers=admin)
        device = session.post(
            f"{base}/operators/BUS1/pos-devices",
            headers=admin,
            json={"terminal_id": "000012000001", "vehicle": "V1"},
        ).json()
        headers = {"Authorization": f"Bearer {device['token']}"}
        per_second = []
        next_seq = 1
        for _ in range(rounds):
            batches = [
                _records("000012000001", next_seq + i * batch_records, batch_records)
                for i in range(batches_per_round)
            ]
            next_seq += batches_per_round * batch_records

            def send(batch: list[dict], http=requests.Session()) -> int:  # noqa: B008
                answer = http.post(
                    f"{base}/pos/records", json={"records": batch}, headers=headers, timeout=60
                )
                assert answer.status_code == 200, answer.text[:300]
                return len(answer.json()["accepted"])

            started = time.perf_counter()
            with ThreadPoolExecutor(client_threads) as pool:
                accepted = sum(pool.map(send, batches))
            elapsed = time.perf_counter() - started
            assert accepted == batches_per_round * batch_records
            per_second.append(accepted / elapsed)
        return {"ingest_records_per_s": statistics.median(per_second)}
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    for figure, value in ingest_figures().items():
        print(
            f"{figure}: {value:.0f} records/s (PostgreSQL, granian {server_workers} "
            f"one-thread workers, {client_threads} client threads, batches of {batch_records})"
        )
