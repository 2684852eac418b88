"""Fixtures for wallet-service tests, on SQLite and on PostgreSQL both.

PostgreSQL: one fresh database per test session (created from the ``test`` database on
127.0.0.1, dropped at the end), migrated once, truncated between tests. SQLite: a
migrated template file copied per test. A missing PostgreSQL skips — and under
REQUIRE_PCSC=1 (CI) a skip naming PostgreSQL fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from bench.scratch import free_port
from tests.helpers import Clock, wait_until_up
from wallet_service import create_app
from wallet_service.auth import create_token
from wallet_service.db import Base
from wallet_service.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "wallet.sqlite"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"wallet_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {error}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@dataclass
class Wallet:
    """A wallet service app, a test client and an admin token."""

    app: Any
    clock: Clock
    admin_token: str
    backend: str

    @property
    def database(self) -> Any:
        return self.app.extensions["database"]

    def client(self) -> Any:
        return self.app.test_client()

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        key: str | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        if key:
            headers["Idempotency-Key"] = key
        response = self.client().open(path, method=method, json=body, headers=headers)
        return response.status_code, response.get_json()

    def ok(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        key: str | None = None,
        status: int | None = None,
    ) -> Any:
        code, answer = self.call(method, path, token, body, key)
        assert code < 300 and (status is None or code == status), (code, answer)
        return answer

    def token(self, role: str, **tenant: str) -> str:
        return self.database.run(
            lambda session: create_token(session, role, at=datetime(2026, 1, 1), **tenant)
        )

    def audited(self, action: str) -> list[dict]:
        """The details of the audit events of ``action``, oldest first."""
        from wallet_service.models import AuditEvent

        with self.database.transaction() as session:
            rows = session.scalars(
                select(AuditEvent.details)
                .where(AuditEvent.action == action)
                .order_by(AuditEvent.id)
            )
            return [json.loads(details) for details in rows]


def _make_wallet(
    url: str, backend: str, tmp_path: Path, config: dict[str, Any] | None = None
) -> Wallet:
    """``config``: settings of the app's beyond (or instead of) the tests' own."""
    clock = Clock(datetime(2026, 11, 25, 9, 0, 0))
    app = create_app(
        {
            "DATABASE_URL": url,
            "PERSONALIZATION_DIR": str(tmp_path / "perso"),
            "CLOCK": clock,
            "KEY_FILE": None,
            "TESTING": True,
            **(config or {}),
        }
    )
    wallet = Wallet(app, clock, "", backend)
    wallet.admin_token = wallet.token("admin")
    return wallet


@pytest.fixture(params=["sqlite", "postgresql"])
def wallet(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> Iterator[Wallet]:
    """The wallet service on each database in turn."""
    if request.param == "sqlite":
        path = tmp_path / "wallet.sqlite"
        shutil.copy(sqlite_template, path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_url")
        _truncate(url)
    wallet = _make_wallet(url, request.param, tmp_path)
    yield wallet
    wallet.database.dispose()


@pytest.fixture
def pg_wallet(postgres_url: str, tmp_path: Path) -> Iterator[Wallet]:
    """The wallet service on PostgreSQL only: for concurrency, which SQLite serializes."""
    _truncate(postgres_url)
    wallet = _make_wallet(postgres_url, "postgresql", tmp_path)
    yield wallet
    wallet.database.dispose()


def _truncate(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        # (a lock an earlier test left behind fails this set-up, instead of hanging the run)
        connection.execute(text("SET LOCAL lock_timeout = '30s'"))
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


class FlaskTransport:
    """reader_sim's platform transport over Flask's test client (for service tests)."""

    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet

    def request(self, method: str, path: str, json: Any, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        response = self.wallet.client().open(path, method=method, json=json, headers=headers)
        return response.status_code, response.get_json()


@dataclass
class BusCompany:
    staff_token: str
    counter_token: str
    pos_token: str
    terminal_id: str
    psam_file: Path


def set_up_bus_company(
    wallet: Wallet, code: str = "BUS1", terminal_id: str = "000012000001"
) -> BusCompany:
    wallet.ok(
        "POST", "/api/v1/operators", body={"code": code, "name": "Bus Co", "fee_rate_bp": 150}
    )
    hall_code = f"HALL-{code}"
    wallet.ok(
        "POST",
        "/api/v1/halls",
        body={"code": hall_code, "name": "Hall", "kind": "hall", "daily_limit_fen": 1_000_000},
    )
    staff = wallet.token("staff", operator_code=code)
    base = f"/api/v1/operators/{code}"
    wallet.ok("POST", f"{base}/fleets", staff, {"code": "F1", "name": "Fleet 1"})
    wallet.ok("POST", f"{base}/routes", staff, {"code": "12", "name": "Route 12", "fare_fen": 200})
    wallet.ok(
        "POST",
        f"{base}/vehicles",
        staff,
        {"code": "V1201", "plate": "A-12345", "fleet": "F1", "route": "12"},
    )
    wallet.ok("POST", f"{base}/drivers", staff, {"code": "D007", "name": "Wang", "fleet": "F1"})
    device = wallet.ok(
        "POST", f"{base}/pos-devices", staff, {"terminal_id": terminal_id, "vehicle": "V1201"}
    )
    perso = Path(wallet.app.config["PERSONALIZATION_DIR"])
    return BusCompany(
        staff,
        wallet.token("counter", hall_code=hall_code),
        device["token"],
        device["terminal_id"],
        perso / device["psam_file"],
    )


ROOT = Path(__file__).resolve().parent.parent
startup_timeout_s = 30


# A port free now, never one handed out before in this run (the system may give a port
# just closed again: seen, a test's SMS centre and bank given the same one).
_free_port = free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """``python app.py serve`` as its own process, on each database in turn — on
    PostgreSQL with four threads a worker, on SQLite one."""
    yield from _serve(request, tmp_path, request.param)


@pytest.fixture
def sqlite_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict]]:
    yield from _serve(request, tmp_path, "sqlite")


def _serve(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> Iterator[tuple[str, dict]]:
    env = {**os.environ, "WALLET_INSTANCE_DIR": str(tmp_path / "instance")}
    if backend == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
        _truncate(env["DATABASE_URL"])
    port = _free_port()
    threads = ["--threads", "4"] if backend == "postgresql" else []
    command = [sys.executable, str(ROOT / "app.py"), "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--workers", "2", *threads],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    if not wait_until_up(f"{base}/health", startup_timeout_s, process):
        process.kill()
        pytest.fail(f"the service did not start: {process.communicate()[1][-2000:]}")
    yield base, env
    process.terminate()
    process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


def cli_token(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "admin", "create-token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@contextmanager
def listening_for_work(wallet: Wallet) -> Iterator[Any]:
    """A LISTEN on the OTA workers' channel of ``wallet``'s PostgreSQL database, as a
    worker's listener has: the connection, whose ``notifies`` tell what came."""
    import psycopg

    from wallet_service.services.bank_webhooks import WORK_CHANNEL

    url = wallet.database.engine.url.set(drivername="postgresql")
    dsn = url.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"LISTEN {WORK_CHANNEL}")
        yield connection
