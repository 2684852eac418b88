"""``make bench``: one ``name: value unit`` line per figure, medians over rounds.

- taps_per_s: a whole tap in memory on one core — SELECT, READ 0x15, INITIALIZE, PSAM
  MAC1, pending stored, DEBIT, PSAM MAC2, record stored (SQLite in memory).
- taps_per_s_durable: the same with the record store on disk (WAL, synchronous=FULL:
  two fsyncs a tap, as a POS that never loses a fare must do).
- ingest_records_per_s: tap records through the HTTP API, batches of 500, PostgreSQL.
- clearing_records_per_s, clearing_peak_rss_mb: a generated day of 1,000,000 records
  cleared by ``app.py clearing run`` in its own process, PostgreSQL.
- pcsc_*: GET BALANCE through pyscard → pcscd → vpcd → TCP → the card model.
- ota_*: over-the-air top-ups end to end, every party its own process (``bench.ota``);
  ota_worker_*: the OTA worker alone, in one process (``bench.ota_worker``), its CPU,
  statements and — under valgrind — instructions per top-up, which the machine's speed
  does not move.
- http_client_*: the client CPU of one SMS centre request, the platform's keep-alive client
  against urllib3's (``bench.http_client``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from reader_sim.link import InMemoryLink
from reader_sim.pos import Outcome
from reader_sim.records import RecordStore
from tests.helpers import Clock, new_card, new_pos

rounds = 5
taps_per_round = 2_000
durable_taps_per_round = 300
cards_in_rotation = 10


def taps_per_second(store: RecordStore, taps: int) -> float:
    clock = Clock()
    pos = new_pos(store, clock=clock, repeat_tap_window_s=0)
    links = [
        InMemoryLink(new_card(i + 1, balance_fen=100_000, seed=i)) for i in range(cards_in_rotation)
    ]
    started = time.perf_counter()
    for i in range(taps):
        clock.advance(seconds=1)
        outcome = pos.present(links[i % cards_in_rotation])
        assert outcome.outcome is Outcome.PAID, outcome
    return taps / (time.perf_counter() - started)


def median_of_rounds(measure) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(measure() for _ in range(rounds))


def main() -> None:
    def in_memory() -> float:
        with RecordStore(":memory:") as store:
            return taps_per_second(store, taps_per_round)

    print(f"taps_per_s: {median_of_rounds(in_memory):.0f} taps/s", flush=True)

    def durable() -> float:
        with (
            tempfile.TemporaryDirectory() as directory,
            RecordStore(Path(directory) / "pos.sqlite") as store,
        ):
            return taps_per_second(store, durable_taps_per_round)

    print(f"taps_per_s_durable: {median_of_rounds(durable):.0f} taps/s", flush=True)

    from bench.ingest import client_threads, ingest_figures, server_workers

    for name, value in ingest_figures().items():
        print(
            f"{name}: {value:.0f} records/s  # PostgreSQL, granian {server_workers} one-thread "
            f"workers, {client_threads} client threads on the same machine",
            flush=True,
        )

    from bench.clearing import clearing_figures, records_total

    figures = clearing_figures()
    print(
        f"clearing_records_per_s: {figures['clearing_records_per_s']:.0f} records/s  "
        f"# {records_total} records on PostgreSQL, TAC verification included",
        flush=True,
    )
    print(f"clearing_peak_rss_mb: {figures['clearing_peak_rss_mb']:.0f} MB", flush=True)

    from bench.ota import ota_figures, ota_lines, ota_workers_scaled_out, scaled_out_line

    print("\n".join(ota_lines(ota_figures())), flush=True)
    print(scaled_out_line(ota_figures(ota_workers_scaled_out)), flush=True)

    from bench.http_client import http_client_lines

    print("\n".join(http_client_lines()), flush=True)

    from bench.ota_worker import (
        CallgrindMissing,
        instructions_per_topup,
        minstr_line,
        worker_figures,
        worker_lines,
    )

    figures = worker_figures(phones=48, rounds=4)
    print("\n".join(worker_lines(figures, 48, 4)), flush=True)
    try:
        print(minstr_line(instructions_per_topup(phones=8, rounds=2), 8, 2), flush=True)
    except CallgrindMissing as missing:
        print(f"ota_worker_minstr_per_topup skipped: {missing}", file=sys.stderr)

    try:
        from bench.pcsc import pcsc_figures
    except ImportError as error:
        print(f"pcsc figures skipped: {error}", file=sys.stderr)
        return
    units = {"_us": "µs", "_ms": "ms"}
    for name, value in pcsc_figures().items():
        unit = next((u for suffix, u in units.items() if name.endswith(suffix)), "")
        print(f"{name}: {value:.1f} {unit}".rstrip(), flush=True)


if __name__ == "__main__":
    main()
