"""ota_topups_per_s and ota_topup_median_ms: over-the-air top-ups end to end on loopback.

Every party is its own process as in production — the wallet service (granian), the SMS
centre (delay 0), the bank, the OTA worker, PostgreSQL — and the phones are simulated in
one more (``bench.ota_phones``: ``reader_sim.phone``, a greenlet a phone, each with its own
SIM and its own connections). One
top-up: the passenger picks "top up" on the SIM menu → request SMS → order → order SMS →
the bank app pays the link → signed callback → packet 1 → PoR → packet 2 → PoR → loaded →
the phone receives the confirmation. Latency is measured over exactly that span.

One worker process (its SMS and due-work threads) is the headline, as on these two cores
it gives the most: two share the queue as they should, but split every batch between them
— more transactions and statements per top-up (1.5–1.8 commits against 2.7–2.9), some 55 %
more worker CPU, less throughput. The throughput with two is printed too
(``ota_topups_per_s_2_workers``), so what scaling out costs here stays in view.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import requests
from sqlalchemy import text

from bench.ingest import ROOT, _start_service, _token
from bench.ota_phones import MERCHANT
from bench.scratch import ScratchDatabase, free_port, scratch_database
from reader_sim.bank import new_webhook_secret
from tests.helpers import wait_until_up

# Phones at once: the top-ups in flight. At 200 top-ups/s a top-up that takes the passenger
# a few seconds means hundreds in flight, and the platform's cost per top-up falls as they
# grow: the worker's batches fill, PostgreSQL's commits are shared. Measured on this
# machine (one run each, 8 top-ups a phone): 48 phones 125 top-ups/s at 13.4 ms of CPU a
# top-up, 96 → 143/s at 12.3 ms, 192 → 178/s at 10.1 ms, 384 → 196/s at 9.4 ms, 512 →
# 200/s at 9.4 ms, 768 → 164/s at 11.3 ms (the phones' 768 threads and the SMS centre's
# waiting polls cost more than the batches save; both were threads then).
phones = 512
topups_per_phone = 8
ota_workers = 1
ota_workers_scaled_out = 2
server_workers = 2
server_threads = 4  # requests at once, each of the service's workers
single_phone_topups = 30
# The first top-ups after start-up pay once for what a running platform has done long
# before: connections opened, caches filled, statements prepared (psycopg prepares one on
# its fifth run on a connection). Measured apart, and printed as such.
warm_up_topups = 10
BANK_CARD = "6222020000000777"


SERVERS = ("service", "smsc", "bank")  # started in this order, then the workers
PLATFORM = ("service", "workers", "postgres")  # what an integrator runs
SIMULATORS = ("smsc", "bank", "phones")  # what stands in for the outside world


def _cpu_by_party(
    processes: list[subprocess.Popen], phones: subprocess.Popen, database: ScratchDatabase
) -> dict[str, float]:
    """CPU seconds (user + system) so far: each party, the workers together, the
    PostgreSQL backends serving ``database``, and the phones (``bench.ota_phones``)."""
    ticks = _ticks_by_process()
    per_second = os.sysconf("SC_CLK_TCK")

    def tree(pid: int) -> float:  # a process and its live children (granian's workers)
        own = ticks.get(pid, (0, 0))[0]
        return (own + sum(t for t, parent in ticks.values() if parent == pid)) / per_second

    cpu = {party: tree(p.pid) for party, p in zip(SERVERS, processes, strict=False)}
    cpu["workers"] = sum(tree(p.pid) for p in processes[len(SERVERS) :])
    with database.admin.connect() as connection:
        backends = connection.scalars(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": database.name}
        ).all()
    cpu["postgres"] = sum(ticks.get(pid, (0, 0))[0] for pid in backends) / per_second
    cpu["phones"] = tree(phones.pid)
    return cpu


def _ticks_by_process() -> dict[int, tuple[int, int]]:
    """pid → (user + system clock ticks, parent pid), read from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12]), int(fields[1]))
    return found


def _start(args: list[str], env: dict) -> subprocess.Popen:
    command = _command([str(ROOT / "app.py"), *args], args[0])
    with _log_file(args[0]) as output:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        )


@contextlib.contextmanager
def _log_file(party: str) -> Iterator[IO[bytes] | None]:
    """The party's output file in BENCH_LOG_DIR, if that is set (each party's output into
    this directory)."""
    logs = os.environ.get("BENCH_LOG_DIR")
    if not logs:
        yield None
        return
    with open(f"{logs}/{party}-{uuid.uuid4().hex[:4]}.log", "wb") as output:
        yield output


def _command(target: list[str], party: str) -> list[str]:
    """A party's command line: under cProfile into BENCH_PROFILE_DIR, if set (its profile
    is written as it exits of itself — the phones do, at the end of their input)."""
    profile = os.environ.get("BENCH_PROFILE_DIR")
    runner = ["-m", "cProfile", "-o", f"{profile}/{party}-{uuid.uuid4().hex[:4]}.prof"]
    return [sys.executable, *(runner if profile else []), *target]


def _wait_up(url: str) -> None:
    if not wait_until_up(url, 30):
        raise RuntimeError(f"{url} did not come up")


def _open_files_as_many_as_allowed() -> None:
    """Each phone keeps two connections (SMS centre, bank): 512 phones want more than the
    usual soft limit of 1,024 open files. Raised to the hard limit, which is allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * phones + 256:
        raise RuntimeError(f"{phones} phones need {2 * phones + 256} open files: ulimit -Hn")


def ota_figures(workers: int = ota_workers) -> dict[str, float]:
    _open_files_as_many_as_allowed()
    with scratch_database("wallet_bench") as database:
        return _ota_figures(database, workers)


def _ota_figures(database: ScratchDatabase, workers: int) -> dict[str, float]:
    instance = Path(f"/tmp/{database.name}")
    secret = new_webhook_secret()
    env = {
        **os.environ,
        "DATABASE_URL": database.url,
        "WALLET_INSTANCE_DIR": str(instance),
        "WALLET_BANK_WEBHOOK_SECRET": secret,
        "BANK_WEBHOOK_SECRET": secret,
    }
    service_port, smsc_port, bank_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{service_port}"
    smsc, bank = f"http://127.0.0.1:{smsc_port}", f"http://127.0.0.1:{bank_port}"
    processes = [_start_service(env, service_port, "--threads", str(server_threads))]
    phones_process: list[subprocess.Popen] = []  # (ended with the rest)
    try:
        processes.append(_start(["smsc", "serve", "--port", str(smsc_port)], env))
        processes.append(
            _start(
                [
                    "bank", "serve", "--port", str(bank_port), "--db",
                    str(instance / "bank.sqlite"), "--merchant",
                    f"{MERCHANT}={base}/api/v1/bank/webhooks",
                ],
                env,
            )
        )  # fmt: skip
        _wait_up(f"{smsc}/stats")
        _wait_up(f"{bank}/api/webhooks")
        for _ in range(workers):
            processes.append(_start(["worker", "--smsc", smsc, "--bank", bank], env))
        requests.post(
            f"{bank}/api/cards",
            json={"number": BANK_CARD, "holder": "Bench", "balance_fen": 10**12},
            timeout=10,
        ).raise_for_status()
        phones_party = _start_phones(_issue_phones(env, base), smsc, bank, phones_process)
        # One phone alone: the flow's own latency (no queue in front of it).
        solo = phones_party.ask({"alone": [warm_up_topups, single_phone_topups]})
        commits_before = _commits(database)
        cpu_before = _cpu_by_party(processes, phones_party.process, database)
        loaded = phones_party.ask({"loaded": topups_per_phone})
        latencies, elapsed = loaded["latencies"], loaded["elapsed_s"]
        commits = _commits(database) - commits_before
        cpu_after = _cpu_by_party(processes, phones_party.process, database)
        figures = {
            "ota_topups_per_s": len(latencies) / elapsed,
            "ota_topup_median_ms": statistics.median(solo["alone"]),
            "ota_topup_median_ms_first": statistics.median(solo["first"]),
            "ota_topup_median_ms_loaded": statistics.median(latencies),
            "pg_commits_per_topup": commits / len(latencies),
        }
        for party, seconds in cpu_after.items():
            used_ms = (seconds - cpu_before.get(party, 0.0)) * 1000
            figures[f"cpu_ms_per_topup_{party}"] = used_ms / len(latencies)
        return figures
    finally:
        for process in phones_process:  # (the end of its input: it exits of itself)
            process.stdin.close()  # type: ignore[union-attr]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in [*processes, *phones_process]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for process in phones_process:
            process.stdout.close()  # type: ignore[union-attr]


def _commits(database: ScratchDatabase) -> int:
    """Transactions committed in ``database`` so far (PostgreSQL's statistics collector)."""
    with database.admin.connect() as connection:
        connection.execute(text("SELECT pg_stat_clear_snapshot()"))
        return connection.scalar(
            text("SELECT xact_commit FROM pg_stat_database WHERE datname = :name"),
            {"name": database.name},
        )


def _issue_phones(env: dict, base: str) -> list[tuple[str, str]]:
    """``phones`` cards issued and activated through the API: (phone number, SIM image)."""
    admin = {"Authorization": f"Bearer {_token(env, '--role', 'admin')}"}
    perso = Path(env["WALLET_INSTANCE_DIR"]) / "personalization"
    issued = []
    for index in range(phones):
        number = f"1390000{index:04d}"
        card = requests.post(
            f"{base}/api/v1/cards",
            json={"iccid": f"898600{index:013d}", "phone": number},
            headers=admin,
            timeout=10,
        ).json()
        requests.post(
            f"{base}/api/v1/cards/{card['serial']}/activate", headers=admin, timeout=10
        ).raise_for_status()
        issued.append((number, str(perso / card["image_file"])))
    return issued


class PhonesParty:
    """``bench.ota_phones`` in its process: one question at a time, one answer a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def ask(self, question: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(question) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the phones' process ended (exit status {self.process.wait()})")
        return json.loads(answer)


def _start_phones(
    issued: list[tuple[str, str]], smsc: str, bank: str, started: list[subprocess.Popen]
) -> PhonesParty:
    """The phones' process, set up (``started``: it, once started). Its errors go to the
    bench's own stderr, or to BENCH_LOG_DIR."""
    command = _command(["-m", "bench.ota_phones", "--parent", str(os.getpid())], "phones")
    with _log_file("phones") as errors:
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
            text=True,
        )  # fmt: skip
    started.append(process)
    party = PhonesParty(process)
    setup = {"phones": issued, "smsc": smsc, "bank": bank, "bank_card": BANK_CARD}
    party.ask(setup)  # → {"ready": n}
    return party


def median_alone_line(figures: dict[str, float]) -> str:
    return (
        f"{figures['ota_topup_median_ms']:.0f} ms  # one phone alone, after "
        f"{warm_up_topups} top-ups since start-up (their median: "
        f"{figures['ota_topup_median_ms_first']:.0f} ms)"
    )


def cpu_ms_per_topup(figures: dict[str, float], parties: tuple[str, ...]) -> float:
    return sum(figures[f"cpu_ms_per_topup_{party}"] for party in parties)


def cpu_lines(figures: dict[str, float]) -> list[str]:
    """CPU per top-up over the loaded run: the platform's own cost, and the simulators'."""

    def per_topup(parties: tuple[str, ...]) -> str:
        parts = ", ".join(f"{p} {figures[f'cpu_ms_per_topup_{p}']:.1f}" for p in parties)
        return f"{cpu_ms_per_topup(figures, parties):.1f} ms  # {parts}"

    return [
        f"ota_platform_cpu_ms_per_topup: {per_topup(PLATFORM)}",
        f"ota_simulators_cpu_ms_per_topup: {per_topup(SIMULATORS)}",
    ]


def ota_lines(figures: dict[str, float], workers: int = ota_workers) -> list[str]:
    """``make bench``'s lines for one run of ``ota_figures``."""
    return [
        f"ota_topups_per_s: {figures['ota_topups_per_s']:.0f} top-ups/s  # {phones} phones x "
        f"{topups_per_phone}, {workers} worker, PostgreSQL, every party its own process",
        f"ota_topup_median_ms: {median_alone_line(figures)}",
        f"ota_topup_median_ms_loaded: {figures['ota_topup_median_ms_loaded']:.0f} ms"
        f"  # {phones} phones at once",
        f"pg_commits_per_topup: {figures['pg_commits_per_topup']:.1f}",
        *cpu_lines(figures),
    ]


def scaled_out_line(figures: dict[str, float], workers: int = ota_workers_scaled_out) -> str:
    """The throughput of a run with several workers, and what they cost per top-up."""
    total = cpu_ms_per_topup(figures, (*PLATFORM, *SIMULATORS))
    return (
        f"ota_topups_per_s_{workers}_workers: {figures['ota_topups_per_s']:.0f} top-ups/s  "
        f"# workers {figures['cpu_ms_per_topup_workers']:.1f} ms CPU a top-up, every party "
        f"{total:.1f}, {figures['pg_commits_per_topup']:.1f} commits"
    )


if __name__ == "__main__":
    print("\n".join(ota_lines(ota_figures())), flush=True)
    print(scaled_out_line(ota_figures(ota_workers_scaled_out)))
