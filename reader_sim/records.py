"""The POS's offline record store: what a bus keeps until the platform acknowledges it.

SQLite (stdlib) in WAL mode: a record is committed before the passenger is told the fare
was paid, so a POS restart loses nothing. Bounded: when ``records_max`` records await
upload, the POS refuses taps rather than drop one. Besides fare records it keeps the
**pending** transactions (a DEBIT sent, its answer not yet seen: the phone may have left
the field), the PSAM's next terminal sequence, and driver sign-ins.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from reader_sim.sqlite_tx import immediate

records_max_default = 100_000
pending_max = 1_000
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    terminal_id BLOB NOT NULL, terminal_seq INTEGER NOT NULL,
    card_serial BLOB NOT NULL, ctc INTEGER NOT NULL, amount INTEGER NOT NULL,
    balance_before INTEGER NOT NULL, balance_after INTEGER NOT NULL,
    transaction_type INTEGER NOT NULL, occurred_at TEXT NOT NULL,
    tac BLOB NOT NULL, mac2 BLOB NOT NULL, mac2_verified INTEGER NOT NULL,
    key_version INTEGER NOT NULL, algorithm INTEGER NOT NULL,
    operator TEXT NOT NULL, route TEXT NOT NULL, vehicle TEXT NOT NULL, driver TEXT NOT NULL,
    recovered INTEGER NOT NULL,
    acknowledged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (terminal_id, terminal_seq)
);
CREATE INDEX IF NOT EXISTS records_by_card ON records (card_serial, occurred_at);
CREATE TABLE IF NOT EXISTS pending (
    card_serial BLOB NOT NULL, ctc INTEGER NOT NULL, amount INTEGER NOT NULL,
    balance_before INTEGER NOT NULL, transaction_type INTEGER NOT NULL,
    terminal_id BLOB NOT NULL, terminal_seq INTEGER NOT NULL, occurred_at TEXT NOT NULL,
    key_version INTEGER NOT NULL, algorithm INTEGER NOT NULL, driver TEXT NOT NULL,
    PRIMARY KEY (terminal_id, terminal_seq)
);
CREATE INDEX IF NOT EXISTS pending_by_card ON pending (card_serial);
CREATE TABLE IF NOT EXISTS blacklist (card_serial BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sign_ins (
    id INTEGER PRIMARY KEY AUTOINCREMENT, terminal_id BLOB NOT NULL,
    driver TEXT NOT NULL, card_serial BLOB NOT NULL, operator TEXT NOT NULL,
    vehicle TEXT NOT NULL, event TEXT NOT NULL, occurred_at TEXT NOT NULL,
    acknowledged INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class TapRecord:
    """One fare, with what clearing needs (card serial, CTC, amounts, TAC, who and where)."""

    terminal_id: bytes
    terminal_seq: int
    card_serial: bytes
    ctc: int  # the offline CTC INITIALIZE returned, as in the card's own log
    amount: int
    balance_before: int
    balance_after: int
    transaction_type: int
    occurred_at: datetime
    tac: bytes
    mac2: bytes
    mac2_verified: bool  # False when completed by GET TRANSACTION PROVE after a tear
    key_version: int
    algorithm: int
    operator: str
    route: str
    vehicle: str
    driver: str
    recovered: bool

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bytes):
                value = value.hex()
            elif isinstance(value, datetime):
                value = value.isoformat()
            out[item.name] = value
        return out


@dataclass(frozen=True)
class PendingDebit:
    """A DEBIT FOR PURCHASE sent whose outcome the POS has not seen yet."""

    card_serial: bytes
    ctc: int
    amount: int
    balance_before: int
    transaction_type: int
    terminal_id: bytes
    terminal_seq: int
    occurred_at: datetime
    key_version: int
    algorithm: int
    driver: str


class StoreFull(Exception):
    """Too many records await upload: the POS must not take another fare."""


class RecordStore:
    def __init__(self, path: str | Path = ":memory:", records_max: int = records_max_default):
        self.path = str(path)
        self.records_max = records_max
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a fare is on disk before "paid"
        try:
            self._db.executescript(_SCHEMA)
            self._check_schema_version()
        except (sqlite3.Error, ValueError):
            self._db.close()
            raise
        self._unacknowledged = self._db.execute(
            "SELECT count(*) FROM records WHERE acknowledged = 0"
        ).fetchone()[0]

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
        elif row[0] != _SCHEMA_VERSION:
            raise ValueError(f"record store {self.path}: schema {row[0]}, expected 1")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- PSAM sequence -------------------------------------------------------------------

    def next_terminal_seq(self, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'terminal_seq'").fetchone()
        return default if row is None else max(default, row[0])

    # --- fares ---------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self._unacknowledged >= self.records_max

    def begin_debit(self, pending: PendingDebit, next_terminal_seq: int) -> None:
        """Before DEBIT reaches the card: remember it, and the sequence it used."""
        if self.full:
            raise StoreFull(f"{self._unacknowledged} records await upload")
        with self._transaction():
            self._save_seq(next_terminal_seq)
            self._db.execute(
                "INSERT INTO pending VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                _row(pending),
            )

    def complete_debit(self, record: TapRecord) -> None:
        """The card answered (or proved) the DEBIT: the record replaces the pending."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0)",
                _row(record),
            )
            self._delete_pending(record.terminal_id, record.terminal_seq)
        self._unacknowledged += 1

    def abandon_debit(self, pending: PendingDebit) -> None:
        """The card proved the DEBIT never happened."""
        with self._transaction():
            self._delete_pending(pending.terminal_id, pending.terminal_seq)

    def _delete_pending(self, terminal_id: bytes, terminal_seq: int) -> None:
        self._db.execute(
            "DELETE FROM pending WHERE terminal_id = ? AND terminal_seq = ?",
            (terminal_id, terminal_seq),
        )

    def pending_for(self, card_serial: bytes) -> list[PendingDebit]:
        """Oldest first. Usually none or one; more only when a card moved on further than
        its log shows before coming back (those wait for clearing to resolve)."""
        rows = self._db.execute(
            "SELECT * FROM pending WHERE card_serial = ? ORDER BY terminal_seq", (card_serial,)
        ).fetchall()
        return [_from_row(PendingDebit, row) for row in rows]

    def pending(self) -> list[PendingDebit]:
        rows = self._db.execute("SELECT * FROM pending ORDER BY terminal_seq").fetchall()
        return [_from_row(PendingDebit, row) for row in rows[:pending_max]]

    def last_fare_at(self, card_serial: bytes) -> datetime | None:
        row = self._db.execute(
            "SELECT max(occurred_at) FROM records WHERE card_serial = ?", (card_serial,)
        ).fetchone()
        return None if row[0] is None else datetime.fromisoformat(row[0])

    def records(self, *, only_unacknowledged: bool = False, limit: int = 1000) -> list[TapRecord]:
        where = "WHERE acknowledged = 0" if only_unacknowledged else ""
        rows = self._db.execute(
            f"SELECT * FROM records {where} ORDER BY terminal_seq LIMIT ?", (limit,)
        ).fetchall()
        return [_from_row(TapRecord, row[:-1]) for row in rows]

    def iter_records(self) -> Iterator[TapRecord]:
        for row in self._db.execute("SELECT * FROM records ORDER BY terminal_seq"):
            yield _from_row(TapRecord, row[:-1])

    def acknowledge(self, terminal_id: bytes, terminal_seqs: list[int]) -> None:
        """The platform has stored these records: they stop counting against the bound."""
        with self._transaction():
            changed = 0
            for seq in terminal_seqs:
                changed += self._db.execute(
                    "UPDATE records SET acknowledged = 1 "
                    "WHERE terminal_id = ? AND terminal_seq = ? AND acknowledged = 0",
                    (terminal_id, seq),
                ).rowcount
        self._unacknowledged -= changed

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM records").fetchone()[0]

    # --- blacklist (downloaded from the platform) -----------------------------------------

    def blacklist(self) -> tuple[int, set[bytes]]:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'blacklist_version'").fetchone()
        serials = {serial for (serial,) in self._db.execute("SELECT card_serial FROM blacklist")}
        return (0 if row is None else row[0]), serials

    def apply_blacklist(
        self, version: int, *, full: bool, added: list[bytes], removed: list[bytes]
    ) -> None:
        """A full list replaces the stored one; a delta adds and removes. One transaction."""
        with self._transaction():
            if full:
                self._db.execute("DELETE FROM blacklist")
            self._db.executemany(
                "INSERT OR IGNORE INTO blacklist VALUES (?)", [(s,) for s in added]
            )
            self._db.executemany(
                "DELETE FROM blacklist WHERE card_serial = ?", [(s,) for s in removed]
            )
            self._db.execute(
                "INSERT INTO meta VALUES ('blacklist_version', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (version,),
            )

    # --- drivers -------------------------------------------------------------------------

    def add_sign_in(
        self,
        *,
        terminal_id: bytes,
        driver: str,
        card_serial: bytes,
        operator: str,
        vehicle: str,
        event: str,
        occurred_at: datetime,
    ) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO sign_ins (terminal_id, driver, card_serial, operator, vehicle,"
                " event, occurred_at) VALUES (?,?,?,?,?,?,?)",
                (
                    terminal_id,
                    driver,
                    card_serial,
                    operator,
                    vehicle,
                    event,
                    occurred_at.isoformat(),
                ),
            )

    def signed_in_driver(self) -> tuple[str, bytes] | None:
        """The driver still signed in after a restart: (driver id, card serial), or None."""
        row = self._db.execute(
            "SELECT driver, card_serial, event FROM sign_ins ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return None if row is None or row[2] != "sign_in" else (row[0], row[1])

    def sign_ins(self) -> list[tuple[str, str, datetime]]:
        rows = self._db.execute("SELECT driver, event, occurred_at FROM sign_ins ORDER BY id")
        return [(driver, event, datetime.fromisoformat(at)) for driver, event, at in rows]

    # --- plumbing ------------------------------------------------------------------------

    def _save_seq(self, next_terminal_seq: int) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES ('terminal_seq', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (next_terminal_seq,),
        )

    def _transaction(self) -> immediate:
        return immediate(self._db)


def _row(item: object) -> tuple[object, ...]:
    # Not dataclasses.astuple: it deep-copies every field, a third of a tap's time.
    values = (getattr(item, column.name) for column in fields(item))  # type: ignore[arg-type]
    return tuple(value.isoformat() if isinstance(value, datetime) else value for value in values)


def _from_row(cls, row):  # type: ignore[no-untyped-def]
    values = []
    for item, value in zip(fields(cls), row, strict=True):
        if item.type == "datetime":
            value = datetime.fromisoformat(value)
        elif item.type == "bool":
            value = bool(value)
        values.append(value)
    return cls(*values)
