"""What every benchmark on PostgreSQL needs: a database of its own, dropped afterwards
(whatever happens), and a free port for a server it starts."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, text

from reader_sim.vpcd import VPCD_PORT_BASE

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class ScratchDatabase:
    name: str
    url: str
    admin: Engine  # autocommit, on the server's admin database: for statistics


@contextmanager
def scratch_database(prefix: str) -> Iterator[ScratchDatabase]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield ScratchDatabase(name, POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", admin)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


_ports_handed_out: set[int] = set()
VPCD_PORTS = (VPCD_PORT_BASE, VPCD_PORT_BASE + 1)  # (a server there keeps vpcd away)


def free_port() -> int:
    """A port free now, never one handed out before in this run (the system may give a
    port just closed again: two servers of one benchmark on one port)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _ports_handed_out and port not in VPCD_PORTS:
            _ports_handed_out.add(port)
            return port
