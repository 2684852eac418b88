"""clearing_records_per_s and clearing_peak_rss_mb: a generated business day of 1,000,000
tap records (valid TACs, 100,000 cards, 500 buses) on PostgreSQL, cleared by
``python app.py clearing run`` in its own process, so its peak RSS is its own."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text

from bench.scratch import scratch_database
from sim_applet.crypto import Algorithm
from sim_applet.issuer import purchase_tac
from sim_applet.personalize import DEMO_ISSUER_KEYS
from wallet_service.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
records_total = int(os.environ.get("BENCH_CLEARING_RECORDS", "1000000"))
cards_total = records_total // 10
buses_total = 500
insert_batch_records = 20_000
DAY = datetime(2026, 11, 25)
FARE_FEN = 200


def _generate(url: str) -> None:
    """Cards ride 10 times each, on rotating buses, balances chained, TACs valid."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO operators (code, name, fee_rate_bp) VALUES ('BUS1', 'Bench', 150)")
        )
        connection.execute(
            text(
                "INSERT INTO accounts (code, kind, debits_fen, credits_fen) "
                "VALUES ('operator_payable:BUS1', 'operator_payable', 0, 0)"
            )
        )
        connection.execute(
            text("INSERT INTO fleets (operator_id, code, name) VALUES (1, 'F1', 'F')")
        )
        connection.execute(
            text(
                "INSERT INTO vehicles (operator_id, fleet_id, code, plate) "
                "SELECT 1, 1, 'V' || n, 'P' || n FROM generate_series(1, :n) n"
            ),
            {"n": buses_total},
        )
        connection.execute(
            text(
                "INSERT INTO pos_devices (operator_id, vehicle_id, terminal_id, psam_key_version) "
                "SELECT 1, n, lpad(to_hex(n), 12, '0'), 1 FROM generate_series(1, :n) n"
            ),
            {"n": buses_total},
        )
    seqs = [0] * (buses_total + 1)
    batch: list[tuple] = []
    rides_per_card = records_total // cards_total
    with engine.begin() as connection:
        raw = connection.connection.dbapi_connection
        with raw.cursor() as cursor:
            for card in range(cards_total):
                serial = card.to_bytes(10, "big")
                balance = 100_000
                for ride in range(rides_per_card):
                    bus = 1 + (card + ride * 7) % buses_total
                    seqs[bus] += 1
                    terminal = bus.to_bytes(6, "big")
                    at = DAY + timedelta(seconds=(card * 37 + ride * 3600) % 86_000)
                    tac = purchase_tac(
                        DEMO_ISSUER_KEYS,
                        Algorithm.TDES,
                        serial,
                        amount=FARE_FEN,
                        transaction_type=6,
                        terminal_id=terminal,
                        terminal_seq=seqs[bus],
                        date_bcd=bytes.fromhex(at.strftime("%Y%m%d")),
                        time_bcd=bytes.fromhex(at.strftime("%H%M%S")),
                    )
                    batch.append(
                        (
                            terminal.hex().upper(),
                            seqs[bus],
                            bus,
                            1,
                            serial.hex().upper(),
                            ride,
                            FARE_FEN,
                            balance,
                            balance - FARE_FEN,
                            6,
                            at,
                            tac.hex().upper(),
                            "00000000",
                            True,
                            1,
                            0,
                            "12",
                            f"V{bus}",
                            "D1",
                            False,
                            at,
                        )
                    )
                    balance -= FARE_FEN
                if len(batch) >= insert_batch_records:
                    _copy(cursor, batch)
                    batch = []
            _copy(cursor, batch)
    engine.dispose()


def _copy(cursor, rows: list[tuple]) -> None:  # type: ignore[no-untyped-def]
    columns = (
        "terminal_id, terminal_seq, device_id, operator_id, card_serial, ctc, amount_fen, "
        "balance_before_fen, balance_after_fen, transaction_type, occurred_at, tac, mac2, "
        "mac2_verified, key_version, algorithm, route, vehicle, driver, recovered, received_at"
    )
    with cursor.copy(f"COPY tap_records ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def clearing_figures() -> dict[str, float]:
    with scratch_database("clearing_bench") as database:
        return _clearing_figures(database.name, database.url)


def _clearing_figures(name: str, url: str) -> dict[str, float]:
    upgrade(url)
    _generate(url)
    env = {**os.environ, "DATABASE_URL": url, "WALLET_INSTANCE_DIR": f"/tmp/{name}"}
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "clearing",
            "run",
            "--date",
            DAY.date().isoformat(),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert f'"paid_records": {records_total}' in result.stdout, result.stdout[:500]
    return {
        "clearing_records_per_s": records_total / elapsed,
        "clearing_peak_rss_mb": peak_kb / 1024,
    }


if __name__ == "__main__":
    figures = clearing_figures()
    print(
        f"clearing_records_per_s: {figures['clearing_records_per_s']:.0f} records/s "
        f"({records_total} records, PostgreSQL, TAC verification included)"
    )
    print(f"clearing_peak_rss_mb: {figures['clearing_peak_rss_mb']:.0f} MB")
