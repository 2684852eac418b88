"""ota_worker_*: what the OTA worker costs the platform per top-up, measured in one process
so that the rest of the machine does not move the figure.

``bench.ota`` runs every party as its own process, and its figures move with the machine's
speed from hour to hour (the same code gave 59 and 96 top-ups/s on one day). Here the whole
flow runs in this process, in lockstep: the phones (``reader_sim.phone`` over an in-process
SMS centre), the bank (``reader_sim.bank``, its signed callbacks posted to the wallet
service's Flask app) and one ``Worker``; PostgreSQL is the only other process. All phones
act at once, so the worker sees full batches, as it does under load; it looks for rare work
(refunds, rekeys) on every pass — its loop does at most once a second, which would make
the figures hang on the clock. Only the worker's steps are counted:

- ota_worker_cpu_ms_per_topup: its CPU time (still moves with the machine's speed);
- ota_worker_statements_per_topup: the SQL statements it runs (exact);
- ota_worker_minstr_per_topup (``--instructions``): the instructions it runs, counted by
  valgrind's callgrind — the same to 0.1 % run after run, whatever else the machine does.
  Compare two commits with it. Takes about two minutes (valgrind runs the whole process).
"""

from __future__ import annotations

import argparse
import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from sqlalchemy import event, func, select

from bench.scratch import scratch_database
from reader_sim.bank import Bank, deliver_due, new_webhook_secret
from reader_sim.phone import Phone, ScriptedScreen
from reader_sim.smsc import SmsCentre
from sim_applet.sim import Sim
from wallet_service import create_app
from wallet_service.auth import create_token
from wallet_service.migrate import upgrade
from wallet_service.models import TopUpOrder
from wallet_service.sms_gateway import InProcessGateway
from wallet_service.worker import Worker

BANK_CARD, SHORT_CODE = "6222020000000777", "10658888"
rounds_to_warm_up = 1
passes_per_round = 12  # a top-up takes five worker passes; the rest find nothing to do


class WorkerMeter:
    """The worker's CPU time and statements; under callgrind, its instructions only."""

    def __init__(self, engine, toggle_collect: Callable[[], None] | None) -> None:  # type: ignore[no-untyped-def]
        self.cpu_s, self.statements, self.on = 0.0, 0, False
        self.toggle_collect = toggle_collect
        event.listen(engine, "before_cursor_execute", self._statement)

    def _statement(self, *_) -> None:  # type: ignore[no-untyped-def]
        self.statements += self.on

    def run(self, step, measured: bool) -> None:  # type: ignore[no-untyped-def]
        toggle = self.toggle_collect if measured else None
        if toggle:
            toggle()
        self.on, started = measured, time.process_time()
        step()
        if measured:
            self.cpu_s += time.process_time() - started
        self.on = False
        if toggle:
            toggle()


_CALLGRIND_SOURCE = """#include <valgrind/callgrind.h>
void start_instrumentation(void) { CALLGRIND_START_INSTRUMENTATION; }
void toggle_collect(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def callgrind_requests(directory: str) -> ctypes.CDLL:
    """callgrind's client requests, compiled here (each is an inline-assembly sequence in
    valgrind's header): instrumenting starts once the warm-up is over (valgrind runs the
    process faster before), and counting starts and stops around each worker step
    without leaving the process. Outside valgrind they do nothing."""
    source, library = Path(directory) / "callgrind.c", Path(directory) / "callgrind.so"
    source.write_text(_CALLGRIND_SOURCE)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    return ctypes.CDLL(str(library))


def worker_figures(phones: int, rounds: int, count_instructions: bool = False) -> dict:
    with scratch_database("wallet_bench") as database, tempfile.TemporaryDirectory() as tmp:
        callgrind = callgrind_requests(tmp) if count_instructions else None
        upgrade(database.url)
        secret = new_webhook_secret()
        app = create_app(
            {
                "DATABASE_URL": database.url,
                "PERSONALIZATION_DIR": f"{tmp}/perso",
                "KEY_FILE": None,
                "BANK_WEBHOOK_SECRET": secret,
            }
        )
        centre, bank = SmsCentre(), Bank(Path(tmp) / "bank.sqlite")
        bank.open_card(BANK_CARD, "Bench", 10**12)
        bank.add_merchant("BUSCARD", "http://platform/api/v1/bank/webhooks")
        handsets = list(issue_phones(app, centre, bank, phones, Path(tmp) / "perso").values())
        worker = Worker(app, InProcessGateway(centre, SHORT_CODE), bank)
        worker.rare_work_look_s = 0.0  # every pass looks: the same run after run
        meter = WorkerMeter(
            app.extensions["database"].engine, callgrind.toggle_collect if callgrind else None
        )
        post = webhooks_to(app)
        for round_ in range(rounds_to_warm_up + rounds):
            measured = round_ >= rounds_to_warm_up
            if callgrind and round_ == rounds_to_warm_up:
                callgrind.start_instrumentation()
            lockstep_round(
                handsets,
                worker,
                bank,
                secret,
                post,
                lambda unit, measured=measured: meter.run(unit, measured),
            )
        topups = phones * rounds
        loaded = app.extensions["database"].run(
            lambda session: session.scalar(select(func.count()).where(TopUpOrder.state == "loaded"))
        )
        expected = phones * (rounds_to_warm_up + rounds)
        if loaded != expected:
            raise RuntimeError(f"{loaded} top-ups loaded of {expected}")
        return {
            "ota_worker_cpu_ms_per_topup": meter.cpu_s * 1000 / topups,
            "ota_worker_statements_per_topup": meter.statements / topups,
        }


def webhooks_to(app) -> Callable[[str, str, dict[str, str]], int]:  # type: ignore[no-untyped-def]
    """The bank's webhook delivery, into the app in this process (``deliver_due``'s post)."""
    client = app.test_client()

    def post(url: str, payload: str, headers: dict[str, str]) -> int:
        return client.post("/api/v1/bank/webhooks", data=payload, headers=headers).status_code

    return post


def lockstep_round(  # type: ignore[no-untyped-def]
    handsets: Iterable[Phone],
    worker: Worker,
    bank: Bank,
    secret: str,
    post: Callable[[str, str, dict[str, str]], int],
    run: Callable[[Callable[[], object]], object] = lambda unit: unit(),
) -> None:
    """Every phone tops up 1 yuan, in lockstep: each pass, the worker reads what SMS came
    and does its due work (each unit through ``run``: a meter), every phone answers, the
    bank delivers its callbacks. ``passes_per_round`` passes: enough for a top-up."""
    handsets = list(handsets)
    for handset in handsets:
        handset.screen.answers[:] = ["1", "123456"]  # 1 yuan, the PIN
        handset.select(4)  # "over-the-air top-up"
    for _ in range(passes_per_round):
        run(lambda: worker.read_sms(0))
        run(worker.do_due_work)
        for handset in handsets:
            handset.receive()
        deliver_due(bank, secret, post)


def issue_phones(app, centre: SmsCentre, bank: Bank, count: int, perso: Path) -> dict[str, Phone]:  # type: ignore[no-untyped-def]
    """``count`` cards issued and activated through the API, each in a phone on ``centre``
    whose bank app pays from BANK_CARD: card serial → phone."""
    admin = app.extensions["database"].run(
        lambda session: create_token(session, "admin", at=datetime(2026, 1, 1))
    )
    client, headers = app.test_client(), {"Authorization": f"Bearer {admin}"}
    handsets = {}
    for index in range(count):
        number = f"1390000{index:04d}"
        card = client.post(
            "/api/v1/cards", json={"iccid": f"898600{index:013d}", "phone": number},
            headers=headers,
        ).json  # fmt: skip
        client.post(f"/api/v1/cards/{card['serial']}/activate", headers=headers)
        handset = Phone(
            Sim.load(perso / card["image_file"]),
            number,
            InProcessGateway(centre, number),
            ScriptedScreen(),
            lambda merchant, order, amount: bank.pay(merchant, order, amount, BANK_CARD),
        )
        handset.power_on()
        handsets[card["serial"]] = handset
    return handsets


class CallgrindMissing(RuntimeError):
    pass


def instructions_per_topup(phones: int, rounds: int) -> float:
    """Millions of instructions the worker runs per top-up: this module again, under
    callgrind, counting only while the worker works."""
    if shutil.which("valgrind") is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        raise CallgrindMissing("needs valgrind and a C compiler: apt-get install valgrind gcc")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, "-m",
                "bench.ota_worker", "--phones", str(phones), "--rounds", str(rounds),
                "--under-callgrind",
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    collected = re.search(r"Collected : (\d+)", run.stderr)
    if collected is None:
        raise RuntimeError(f"callgrind said no total:\n{run.stderr[-2000:]}")
    return int(collected.group(1)) / (phones * rounds) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--under-callgrind", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.phones < 1 or options.rounds < 1:
        parser.error("--phones and --rounds are at least 1")
    if options.instructions:
        # Fewer top-ups: valgrind runs the process some 50 times slower.
        phones, rounds = min(options.phones, 8), min(options.rounds, 2)
        try:
            minstr = instructions_per_topup(phones, rounds)
        except CallgrindMissing as missing:
            parser.exit(2, f"--instructions {missing}\n")
        print(minstr_line(minstr, phones, rounds))
        return
    figures = worker_figures(options.phones, options.rounds, options.under_callgrind)
    print("\n".join(worker_lines(figures, options.phones, options.rounds)))


def worker_lines(figures: dict, phones: int, rounds: int) -> list[str]:
    """The figures, each with the run's shape (per top-up, they include the passes that
    found nothing to do: compare runs of one shape)."""
    note = f"# {phones} phones x {rounds}, one worker, PostgreSQL"
    return [
        f"ota_worker_cpu_ms_per_topup: {figures['ota_worker_cpu_ms_per_topup']:.2f} ms  {note}",
        f"ota_worker_statements_per_topup: {figures['ota_worker_statements_per_topup']:.2f}",
    ]


def minstr_line(minstr: float, phones: int, rounds: int) -> str:
    return f"ota_worker_minstr_per_topup: {minstr:.2f} Minstr  # {phones} phones x {rounds}"


if __name__ == "__main__":
    main()
