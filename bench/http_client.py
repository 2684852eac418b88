"""http_client_cpu_us_per_request: what one SMS centre request costs the client's CPU —
``wallet_service.http_client.KeepAliveClient`` against urllib3's PoolManager (the SMS
gateway's client before it). Every top-up crosses the SMS centre some fourteen times, from
the phones and the workers, so this is paid on both sides of ``bench.ota``.

One ``app.py smsc serve`` process; this process asks ``POST /inbox/…/next`` (an empty
inbox: the answer is small, as most are) over one kept-alive connection per client, in
interleaved rounds. Only this process's CPU is counted (``time.process_time``), never the
server's; the figures are medians of the rounds.

    PYTHONPATH=. .venv/bin/python -m bench.http_client
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import urllib3

from bench.ingest import ROOT
from bench.scratch import free_port
from tests.helpers import wait_until_up
from wallet_service.http_client import KeepAliveClient

rounds = 5
requests_per_round = 2_000
warm_up_requests = 100
INBOX_REQUEST = {"ack": [], "wait_ms": 0, "lease_ms": 0}


def cpu_us_per_request(ask: Callable[[], object]) -> float:
    for _ in range(warm_up_requests):
        ask()
    started = time.process_time()
    for _ in range(requests_per_round):
        ask()
    return (time.process_time() - started) / requests_per_round * 1e6


def client_figures(port: int) -> dict[str, float]:
    origin, target = f"http://127.0.0.1:{port}", "/inbox/10658888/next"
    keep_alive = KeepAliveClient(origin)
    pool = urllib3.PoolManager(retries=False)

    def with_keep_alive() -> object:
        return keep_alive.request("POST", target, json=INBOX_REQUEST, timeout_s=10).json()

    def with_urllib3() -> object:
        return pool.request("POST", origin + target, json=INBOX_REQUEST, timeout=10).json()

    samples: dict[str, list[float]] = {"keep_alive": [], "urllib3": []}
    for _ in range(rounds):
        samples["keep_alive"].append(cpu_us_per_request(with_keep_alive))
        samples["urllib3"].append(cpu_us_per_request(with_urllib3))
    keep_alive.close()
    pool.clear()
    return {name: statistics.median(values) for name, values in samples.items()}


def http_client_lines() -> list[str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "smsc", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_until_up(f"http://127.0.0.1:{port}/stats", 30, server):
            raise RuntimeError("the SMS centre did not come up")
        figures = client_figures(port)
    finally:
        server.terminate()
        server.wait(timeout=10)
    shape = f"# POST /inbox/…/next, median of {rounds} rounds of {requests_per_round}"
    return [
        f"http_client_cpu_us_per_request: {figures['keep_alive']:.0f} µs  {shape}",
        f"http_client_cpu_us_per_request_urllib3: {figures['urllib3']:.0f} µs  # the same, "
        "urllib3's PoolManager (the SMS gateway's client before)",
    ]


def main() -> None:
    print("\n".join(http_client_lines()))


if __name__ == "__main__":
    main()
