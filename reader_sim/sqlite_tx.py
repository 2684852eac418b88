"""``with immediate(db):`` — one SQLite write transaction (BEGIN IMMEDIATE takes the write
lock up front, so concurrent writers wait instead of failing mid-way); rolled back on error."""

from __future__ import annotations

import sqlite3


class immediate:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
