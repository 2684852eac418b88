"""The connection pool: a connection the database dropped while it sat idle is replaced
before anyone uses it; one used within the second is not pinged (a round trip saved on
every transaction), and the pool is renewed after its one failure."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.wallet_fixtures import Wallet
from wallet_service import db


def _backend(wallet: Wallet) -> int:
    return wallet.database.run(lambda session: session.scalar(text("SELECT pg_backend_pid()")))


def _dropped_by_the_database(wallet: Wallet, pid: int) -> None:
    """As a restart or an idle timeout would drop it (another connection ends it)."""
    admin = create_engine(wallet.database.engine.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # (waits up to 5 s for it to end, not only to be told)
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
    admin.dispose()


def test_a_connection_dropped_while_idle_is_replaced_unseen(
    pg_wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "pool_ping_after_idle_s", 0.0)  # (idle a while: any time)
    first = _backend(pg_wallet)
    assert _backend(pg_wallet) == first  # pinged, alive: kept
    _dropped_by_the_database(pg_wallet, first)
    assert _backend(pg_wallet) != first  # pinged at checkout, replaced: no error


def test_a_pinged_connection_is_back_in_its_transaction_mode(
    pg_wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The ping runs in autocommit; left so, a failed transaction would keep its writes.)"""
    monkeypatch.setattr(db, "pool_ping_after_idle_s", 0.0)
    _backend(pg_wallet)

    def written_then_failed(session) -> None:  # type: ignore[no-untyped-def]
        session.execute(
            text("INSERT INTO operators (code, name, fee_rate_bp) VALUES ('X', 'x', 0)")
        )
        raise RuntimeError("fails after writing")

    with pytest.raises(RuntimeError):
        pg_wallet.database.run(written_then_failed)
    count = "SELECT count(*) FROM operators WHERE code = 'X'"
    assert pg_wallet.database.run(lambda session: session.scalar(text(count))) == 0


def test_a_connection_dropped_within_the_second_fails_once_then_the_pool_is_renewed(
    pg_wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the saved round trip costs (SQLAlchemy's own disconnect handling, here)."""
    monkeypatch.setattr(db, "pool_ping_after_idle_s", 3600.0)  # (never idle long enough)
    first = _backend(pg_wallet)
    _dropped_by_the_database(pg_wallet, first)
    with pytest.raises(OperationalError):
        _backend(pg_wallet)
    assert _backend(pg_wallet) != first


def test_the_service_answers_503_with_retry_after_when_the_database_is_gone(
    pg_wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing was committed: the client asks again (the bank's webhooks do)."""
    monkeypatch.setattr(db, "pool_ping_after_idle_s", 3600.0)
    _dropped_by_the_database(pg_wallet, _backend(pg_wallet))
    admin = {"Authorization": f"Bearer {pg_wallet.admin_token}"}
    answer = pg_wallet.client().get("/api/v1/ledger", headers=admin)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (503, "unavailable")
    assert answer.headers["Retry-After"] == "1"
    assert pg_wallet.call("GET", "/api/v1/ledger")[0] == 200  # the pool renewed


def test_a_bank_callback_on_a_dropped_connection_is_answered_503_then_stored(
    pg_wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback is stored by work run as one statement, its guard on the connection's
    info: the connection lost, reading that info raised, and the bank was told 500."""
    from tests.test_db_limits import _signed_callback

    monkeypatch.setattr(db, "pool_ping_after_idle_s", 3600.0)
    secret = pg_wallet.app.config["BANK_WEBHOOK_SECRET"] = "whsec_" + "QUJD" * 8
    body, headers = _signed_callback(secret, "msg_dropped")
    _dropped_by_the_database(pg_wallet, _backend(pg_wallet))
    answer = pg_wallet.client().post("/api/v1/bank/webhooks", data=body, headers=headers)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (503, "unavailable")
    again = pg_wallet.client().post("/api/v1/bank/webhooks", data=body, headers=headers)
    assert again.status_code < 300  # the pool renewed; stored now


class _Orig(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("message", "sqlstate", "busy_or_gone"),
    [
        ("server closed the connection unexpectedly", "08006", True),
        ("terminating connection due to administrator command", "57P01", True),
        ("could not serialize access", "40001", True),
        ("canceling statement due to statement timeout", "57014", True),
        ("terminating connection due to idle-in-transaction timeout", "25P03", True),
        ("database is locked", None, True),  # (SQLite)
        ("password authentication failed", "28P01", False),
        ("index row size exceeds maximum", "54000", False),
        ("no such table: operators", None, False),  # (SQLite)
    ],
)
def test_only_a_database_busy_or_gone_is_a_503(
    message: str, sqlstate: str | None, busy_or_gone: bool
) -> None:
    from wallet_service.api.framework import database_busy_or_gone

    error = OperationalError("SELECT 1", {}, _Orig(message, sqlstate))
    assert database_busy_or_gone(error) is busy_or_gone
