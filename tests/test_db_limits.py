"""PostgreSQL's limits on each of the platform's connections (``db.SessionLimits``): a
worker hung inside its transaction lets go of the orders it claimed, and a request stuck
behind a lock is answered (503, ask again) instead of holding its thread for ever."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from reader_sim.bank import signed_headers
from tests.test_wallet_topups import MemoryChannel, World
from tests.wallet_fixtures import Wallet, _make_wallet, _truncate
from wallet_service import default_config
from wallet_service.db import SessionLimits
from wallet_service.errors import ConfigurationError
from wallet_service.services import topups

IDLE_LIMIT_S = 2.0  # (short, for the test; the default is a minute)
STATEMENT_LIMIT_S = 2.0  # (every statement of the test's: not shorter, on a slow machine)


@pytest.fixture
def limited(postgres_url: str, tmp_path: Path) -> Iterator[Callable[..., Wallet]]:
    """The wallet service on PostgreSQL with the limits given (config keys)."""
    made: list[Wallet] = []

    def make(**limits: float) -> Wallet:
        _truncate(postgres_url)
        made.append(_make_wallet(postgres_url, "postgresql", tmp_path, limits))
        return made[-1]

    yield make
    for wallet in made:
        wallet.database.dispose()


def _hung_worker_claims_the_order(world: World):  # type: ignore[no-untyped-def]
    """A worker claims the paid order and sends packet 1 in its transaction, then hangs
    before its commit (stopped, not killed: its connection stays open). Its packets go to a
    channel of its own: with its commit failed, the real channel never sends them."""
    hung = world.wallet.database._sessions()
    hung.begin()
    try:
        actions = topups.work_batch(world.context(hung), MemoryChannel({}), world.bank)
        assert [result.action for result in actions] == ["packet 1 sent"]
    except BaseException:
        hung.close()  # (its locks would hang the next test's set-up)
        raise
    return hung


def test_an_order_claimed_by_a_worker_hung_in_its_transaction_is_finished_by_another(
    limited: Callable[..., Wallet], tmp_path: Path
) -> None:
    wallet = limited(DB_IDLE_IN_TRANSACTION_TIMEOUT_S=IDLE_LIMIT_S)
    world = World(wallet, tmp_path)
    reference = world.order()
    world.pay(reference)
    hung = _hung_worker_claims_the_order(world)
    try:
        assert world.work() is None  # claimed (SKIP LOCKED): the others pass it by, for now
        deadline = time.monotonic() + IDLE_LIMIT_S + 10
        while (action := world.work()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert action == "packet 1 sent"  # the database ended the hung one's session
        with pytest.raises(DBAPIError):  # (how psycopg says so depends on the statement)
            hung.commit()  # the hung worker wakes: its transaction is gone, nothing kept
    finally:
        hung.close()
    assert world.deliver() == "packet 2 sent"
    assert world.deliver() == "loaded"
    books = world.books()
    assert books[f"card_float:{world.serial}"] == 3000
    assert books["topup_pending:platform"] == 0 and books["bank_settlement:bank"] == -3000
    world.bank.close()


def test_without_the_limit_the_hung_worker_keeps_the_order(
    limited: Callable[..., Wallet], tmp_path: Path
) -> None:
    """(What the limit is for: the same story with none.)"""
    wallet = limited(DB_IDLE_IN_TRANSACTION_TIMEOUT_S=0)
    world = World(wallet, tmp_path)
    reference = world.order()
    world.pay(reference)
    hung = _hung_worker_claims_the_order(world)
    try:
        time.sleep(IDLE_LIMIT_S + 1)
        assert world.work() is None
    finally:
        hung.close()  # (rolled back)
    assert world.work() == "packet 1 sent"
    world.bank.close()


def _signed_callback(secret: str, webhook_id: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "type": "payment.succeeded",
            "data": {"order_id": "NO-SUCH-ORDER", "payment_id": "pay_1", "amount_fen": 100},
        }
    )
    return body.encode(), signed_headers(secret, webhook_id, body, datetime.now())


def test_a_callback_stuck_behind_a_twin_s_open_transaction_is_answered_503_then_stored_once(
    limited: Callable[..., Wallet],
) -> None:
    """The bank delivers a callback twice; the first delivery's transaction hangs before
    its commit. The second waits on the first's row — then its statement is cancelled, the
    bank is told to ask again, and asking again after the first one ended stores it once."""
    wallet = limited(DB_STATEMENT_TIMEOUT_S=STATEMENT_LIMIT_S)
    secret = wallet.app.config["BANK_WEBHOOK_SECRET"] = "whsec_" + "QUJD" * 8
    body, headers = _signed_callback(secret, "msg_twin")
    twin = create_engine(wallet.database.engine.url)
    with twin.connect() as first:
        first.execute(
            text(
                "INSERT INTO bank_webhook_events (id, event_type, payload, received_at) "
                "VALUES ('msg_twin', 'payment.succeeded', :payload, now())"
            ),
            {"payload": body.decode()},
        )  # not committed: the first delivery, hung
        answered: list = []
        thread = threading.Thread(
            target=lambda: answered.append(
                wallet.client().post("/api/v1/bank/webhooks", data=body, headers=headers)
            )
        )
        thread.start()
        thread.join(timeout=STATEMENT_LIMIT_S + 10)
        assert not thread.is_alive(), "the request should have been answered"
        first.rollback()
    twin.dispose()
    answer = answered[0]
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (503, "unavailable")
    assert "Retry-After" in answer.headers
    again = wallet.client().post("/api/v1/bank/webhooks", data=body, headers=headers)
    assert (again.status_code, again.get_json()["duplicate"]) == (200, False)
    stored = "SELECT count(*) FROM bank_webhook_events WHERE id = 'msg_twin'"
    assert wallet.database.run(lambda session: session.scalar(text(stored))) == 1


def _shown(wallet: Wallet) -> list[str]:
    names = ("statement_timeout", "idle_in_transaction_session_timeout")
    return wallet.database.run(
        lambda session: [session.scalar(text(f"SHOW {name}")) for name in names]
    )


def test_the_limits_are_set_on_every_connection_and_those_who_run_it_have_the_last_word(
    limited: Callable[..., Wallet], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)
    assert _shown(limited(DB_STATEMENT_TIMEOUT_S=12.5)) == ["12500ms", "1min"]
    assert _shown(limited(DB_STATEMENT_TIMEOUT_S=0, DB_IDLE_IN_TRANSACTION_TIMEOUT_S=0)) == [
        "0",
        "0",
    ]  # (not set: the server's own)
    monkeypatch.setenv("PGOPTIONS", "-c idle_in_transaction_session_timeout=5000")
    separator = "&" if "?" in postgres_url else "?"
    own = f"{postgres_url}{separator}options=-c%20statement_timeout%3D7000"
    assert _shown(limited(DATABASE_URL=own)) == ["7s", "5s"]


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "86401", "0.0004"])
def test_a_limit_that_is_not_a_number_of_seconds_is_refused_at_start(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WALLET_DB_STATEMENT_TIMEOUT_S", value)
    with pytest.raises(ConfigurationError, match="WALLET_DB_STATEMENT_TIMEOUT_S"):
        default_config()


def test_the_limits_as_startup_options() -> None:
    assert SessionLimits().startup_options() == (
        "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000"
    )
    assert SessionLimits(0.25, 0).startup_options() == "-c statement_timeout=250"
    assert SessionLimits(0, 0).startup_options() == ""


def test_a_csv_download_read_slowly_is_whole(
    limited: Callable[..., Wallet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that pauses longer than the idle limit between two parts of a download
    still gets every record: no transaction is held while it reads (one held would be
    ended, and the download cut short with a 200 and nothing to tell)."""
    from tests.test_wallet_reports import busy_day
    from wallet_service.services import reports

    monkeypatch.setattr(reports, "csv_batch_records", 2)  # (nine records: five batches)
    wallet = limited(DB_IDLE_IN_TRANSACTION_TIMEOUT_S=IDLE_LIMIT_S)
    company = busy_day(wallet, tmp_path)
    response = wallet.client().get(
        "/api/v1/operators/BUS1/records.csv",
        headers={"Authorization": f"Bearer {company.staff_token}"},
        buffered=False,
    )
    parts = iter(response.response)
    first = next(parts)
    assert first.count(b"\n") < 10  # (the pause comes before the last batch is read)
    time.sleep(IDLE_LIMIT_S + 1)
    text_read = b"".join([first, *parts]).decode()
    response.close()
    rows = list(csv.DictReader(io.StringIO(text_read)))
    ids = [int(row["id"]) for row in rows]
    assert len(ids) == 9 and ids == sorted(set(ids))


def test_a_driver_error_of_another_class_in_a_transient_state_is_a_503(tmp_path: Path) -> None:
    """(psycopg raises a transaction ended for idling as an InternalError, not an
    OperationalError.)"""
    from sqlalchemy.exc import InternalError

    from wallet_service import create_app

    class Orig(Exception):
        sqlstate = "25P03"

    app = create_app(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'w.sqlite'}",
            "PERSONALIZATION_DIR": str(tmp_path / "perso"),
            "KEY_FILE": None,
        }
    )

    @app.get("/ended")
    def ended():  # type: ignore[no-untyped-def]
        raise InternalError("SELECT 1", {}, Orig("idle-in-transaction timeout"))

    @app.get("/broken")
    def broken():  # type: ignore[no-untyped-def]
        raise InternalError("SELECT 1", {}, Exception("an internal error"))

    client = app.test_client()
    answer = client.get("/ended")
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (503, "unavailable")
    assert client.get("/broken").status_code == 500


def test_a_day_s_clearing_is_not_cut_by_the_statement_limit(
    limited: Callable[..., Wallet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(All or nothing over the whole day: a statement cancelled once would be cancelled
    at every retry.) A statement in the run outlasts the limit, and the day clears."""
    from tests.test_wallet_reports import busy_day
    from wallet_service.services import clearing

    wallet = limited(DB_STATEMENT_TIMEOUT_S=STATEMENT_LIMIT_S)
    busy_day(wallet, tmp_path)
    verify, backend = clearing._verify, []

    def slow_verify(session, *args):  # type: ignore[no-untyped-def]
        backend.append(session.scalar(text("SELECT pg_backend_pid()")))
        waits = session.scalar(text("SELECT current_setting('lock_timeout')"))
        assert waits == "2s"  # (its waits for locks keep the bound)
        session.execute(text("SELECT pg_sleep(:s)"), {"s": STATEMENT_LIMIT_S + 0.5})
        return verify(session, *args)

    monkeypatch.setattr(clearing, "_verify", slow_verify)
    report = wallet.ok("POST", "/api/v1/clearing/runs", body={"date": "2026-11-25"}, status=201)
    assert report["paid_records"] == 9
    # The run's connection, back in the pool, has its limit again (SET LOCAL: the run's
    # transaction only). Sessions held open one after another reach every pooled one.
    held = []
    try:
        for _ in range(30):  # (the pool's size and overflow)
            session = wallet.database._sessions()
            held.append(session)
            pid, limit = session.execute(
                text("SELECT pg_backend_pid(), current_setting('statement_timeout')")
            ).one()
            if pid == backend[0]:
                break
    finally:
        for session in held:
            session.close()
    assert (pid, limit) == (backend[0], "2s")


def test_an_sms_whose_connection_ended_is_not_written_off_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker handles a batch's messages one by one after the batch failed; a message
    whose transaction's connection was ended under it (an idle transaction, psycopg's
    InternalError) is not its own fault: it is raised, not acknowledged as "failed", and
    comes again. One the database refused for itself is set aside, its packets dropped."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from sqlalchemy.exc import InternalError

    from wallet_service import worker

    class Ended(Exception):
        sqlstate = "25P03"

    def raising(error: Exception):  # type: ignore[no-untyped-def]
        def handle(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
            box.deliver("13800000000", b"packet")  # (a packet the message made)
            raise error

        return handle

    box = SimpleNamespace(pending=[], mark=lambda: len(box.pending))
    box.deliver = lambda phone, packet: box.pending.append(packet)
    box.discard_since = lambda mark: box.pending.__delitem__(slice(mark, None))
    ctx = SimpleNamespace(session=SimpleNamespace(begin_nested=nullcontext))
    sms = SimpleNamespace(sender="13800000000")

    ended = InternalError("SELECT 1", {}, Ended("idle-in-transaction timeout"))
    ended.connection_invalidated = True
    monkeypatch.setattr(worker, "handle_incoming_sms", raising(ended))
    with pytest.raises(InternalError):
        worker._handle_one(ctx, box, sms, "BUSCARD")

    box.pending.clear()
    refused = InternalError("SELECT 1", {}, Exception("a value the database refused"))
    monkeypatch.setattr(worker, "handle_incoming_sms", raising(refused))
    assert worker._handle_one(ctx, box, sms, "BUSCARD") == "failed"
    assert box.pending == []
