"""The POS's record store: nothing lost across restarts, bounded, acknowledged once."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from reader_sim.records import PendingDebit, RecordStore, StoreFull, TapRecord

AT = datetime(2026, 11, 25, 8, 0, 0)
TERMINAL = bytes.fromhex("000012000001")


def pending(seq: int, serial: bytes = b"\x01" * 10) -> PendingDebit:
    return PendingDebit(serial, seq - 1, 200, 1000, 0x06, TERMINAL, seq, AT, 1, 0, "D007")


def record_for(p: PendingDebit) -> TapRecord:
    return TapRecord(
        p.terminal_id,
        p.terminal_seq,
        p.card_serial,
        p.ctc,
        p.amount,
        p.balance_before,
        p.balance_before - p.amount,
        p.transaction_type,
        p.occurred_at,
        b"\xaa" * 4,
        b"\xbb" * 4,
        True,
        p.key_version,
        p.algorithm,
        "BUS-CO-1",
        "12",
        "V-1201",
        p.driver,
        False,
    )


def test_records_pendings_and_the_terminal_sequence_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "pos.sqlite"
    with RecordStore(path) as store:
        store.begin_debit(pending(1), next_terminal_seq=2)
        store.complete_debit(record_for(pending(1)))
        store.begin_debit(pending(2), next_terminal_seq=3)
    with RecordStore(path) as reopened:
        assert reopened.records() == [record_for(pending(1))]
        assert reopened.pending_for(b"\x01" * 10) == [pending(2)]
        assert reopened.next_terminal_seq(default=1) == 3


def test_a_record_stored_twice_is_refused_and_the_first_is_kept() -> None:
    with RecordStore() as store:
        store.begin_debit(pending(1), 2)
        store.complete_debit(record_for(pending(1)))
        with pytest.raises(sqlite3.IntegrityError):
            store.complete_debit(record_for(pending(1)))
        assert store.count() == 1


def test_the_bound_counts_unacknowledged_records_only(tmp_path: Path) -> None:
    with RecordStore(tmp_path / "pos.sqlite", records_max=2) as store:
        for seq in (1, 2):
            store.begin_debit(pending(seq, serial=bytes([seq]) * 10), seq + 1)
            store.complete_debit(record_for(pending(seq, serial=bytes([seq]) * 10)))
        assert store.full
        with pytest.raises(StoreFull):
            store.begin_debit(pending(3), 4)
        store.acknowledge(TERMINAL, [1, 1, 99])  # repeats and unknowns count nothing
        assert not store.full
        assert [r.terminal_seq for r in store.records(only_unacknowledged=True)] == [2]
    with RecordStore(tmp_path / "pos.sqlite", records_max=2) as reopened:
        assert not reopened.full


def test_a_store_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pos.sqlite"
    RecordStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    db.close()
    with pytest.raises(ValueError, match="schema 99"):
        RecordStore(path)
