"""The simulated bank and its signed callbacks into the wallet service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import event, func, select
from standardwebhooks import Webhook

from reader_sim.bank import Bank, BankRefused, deliver_due, new_webhook_secret, signed_headers
from tests.helpers import Clock, serving, wait_until_up
from tests.wallet_fixtures import Wallet, _free_port, listening_for_work
from wallet_service.models import BankWebhookEvent

CARD = "6222020000000001"
MERCHANT = "BUSCARD"


@pytest.fixture
def bank(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = Clock(datetime.now().replace(microsecond=0))
    the_bank = Bank(tmp_path / "bank.sqlite", clock=clock)
    the_bank.open_card(CARD, "Li Lei", 10_000)
    the_bank.add_merchant(MERCHANT, "http://platform.invalid/api/v1/bank/webhooks")
    yield the_bank
    the_bank.close()


def test_a_payment_moves_money_once_per_order(bank: Bank) -> None:
    first = bank.pay(MERCHANT, "order-1", 3000, CARD)
    assert bank.pay(MERCHANT, "order-1", 3000, CARD) == first
    with pytest.raises(BankRefused) as conflict:
        bank.pay(MERCHANT, "order-1", 3001, CARD)
    assert conflict.value.code == "order_conflict"
    with pytest.raises(BankRefused) as poor:
        bank.pay(MERCHANT, "order-2", 9000, CARD)
    assert poor.value.code == "insufficient_funds"
    assert (bank.card_balance(CARD), bank.merchant_balance(MERCHANT)) == (7000, 3000)


def test_refunds_never_exceed_the_payment_and_happen_once_per_key(bank: Bank) -> None:
    payment = bank.pay(MERCHANT, "order-1", 3000, CARD)
    refund = bank.refund(payment.id, 2000, "not loaded", "refund-1")
    assert bank.refund(payment.id, 2000, "not loaded", "refund-1") == refund
    with pytest.raises(BankRefused):
        bank.refund(payment.id, 1001, "again", "refund-2")
    assert bank.card_balance(CARD) == 9000
    statement = bank.statement(MERCHANT, date.today()).splitlines()
    assert statement[0] == "kind,id,payment_id,order_id,amount_fen,at"
    assert [line.split(",")[0] for line in statement[1:]] == ["payment", "refund"]
    assert statement[2].split(",")[4] == "-2000"


def test_webhooks_are_signed_and_retried_with_backoff_until_2xx(bank: Bank) -> None:
    secret = new_webhook_secret()
    bank.pay(MERCHANT, "order-1", 3000, CARD)
    answers = iter([None, 500, 204])
    seen: list[tuple[str, dict[str, str]]] = []

    def post(url: str, payload: str, headers: dict[str, str]) -> int | None:
        seen.append((payload, headers))
        return next(answers)

    assert deliver_due(bank, secret, post) == 0  # unreachable
    assert deliver_due(bank, secret, post) == 0  # not due yet: backing off
    bank.clock.advance(seconds=1)
    assert deliver_due(bank, secret, post) == 0  # 500
    bank.clock.advance(seconds=1)
    assert deliver_due(bank, secret, post) == 0  # backoff doubled: 2 s
    bank.clock.advance(seconds=1)
    assert deliver_due(bank, secret, post) == 1
    assert deliver_due(bank, secret, post) == 0  # delivered: never again
    payload, headers = seen[-1]
    assert Webhook(secret).verify(payload, headers)["data"]["order_id"] == "order-1"
    assert len({h["webhook-id"] for _, h in seen}) == 1  # retries keep their id


def _deliver_to(wallet: Wallet):  # type: ignore[no-untyped-def]
    def post(url: str, payload: str, headers: dict[str, str]) -> int:
        return (
            wallet.client().post("/api/v1/bank/webhooks", data=payload, headers=headers).status_code
        )

    return post


def _events(wallet: Wallet) -> int:
    with wallet.database.transaction() as session:
        return session.scalar(select(func.count()).select_from(BankWebhookEvent))


def test_the_platform_stores_each_callback_once(wallet: Wallet, bank: Bank) -> None:
    secret = new_webhook_secret()
    wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    bank.pay(MERCHANT, "order-1", 3000, CARD)
    assert deliver_due(bank, secret, _deliver_to(wallet)) == 1
    ((webhook_id, _, payload, _),) = bank._execute(  # the same callback, delivered again
        "SELECT w.id, m.callback_url, w.payload, w.merchant FROM webhooks w "
        "JOIN merchants m ON m.id = w.merchant"
    )
    again = wallet.client().post(
        "/api/v1/bank/webhooks",
        data=payload,
        headers=signed_headers(secret, webhook_id, payload, bank.clock()),
    )
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert _events(wallet) == 1


def test_a_callback_is_stored_by_one_statement_that_is_its_own_transaction(
    wallet: Wallet, bank: Bank
) -> None:
    """On PostgreSQL the statement runs in autocommit: psycopg sends no BEGIN and no COMMIT
    (two round trips of three a callback), and the connection goes back to the pool
    transactional again, or the next unit of work on it would not be all-or-nothing. On
    SQLite (no round trips) it runs in a transaction, as every unit of work there does."""
    secret = new_webhook_secret()
    wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    sent: list[tuple[str, Any, bool | None]] = []

    def seen(connection, _cursor, statement, *_):  # type: ignore[no-untyped-def]
        dbapi = connection.connection.dbapi_connection
        if not statement.startswith("SELECT coalesce(sum("):  # (the tests' ledger check)
            sent.append((statement.split()[0], dbapi, getattr(dbapi, "autocommit", None)))

    engine = wallet.database.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        bank.pay(MERCHANT, "order-1", 3000, CARD)
        assert deliver_due(bank, secret, _deliver_to(wallet)) == 1
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert _events(wallet) == 1
    if wallet.backend == "postgresql":
        ((statement, connection, autocommit),) = sent  # the INSERT, and NOTIFY the workers
        assert (statement, autocommit) == ("WITH", True)
        assert connection.autocommit is False  # back in the pool, transactional
    else:
        assert [statement for statement, _, _ in sent] == ["BEGIN", "INSERT"]  # (IMMEDIATE)


@pytest.mark.parametrize("tamper", ["signature", "body", "stale", "no_headers", "bad_header"])
def test_forged_replayed_or_malformed_callbacks_change_nothing(
    wallet: Wallet, bank: Bank, tamper: str
) -> None:
    secret = new_webhook_secret()
    wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    payload = json.dumps({"type": "payment.succeeded", "data": {"order_id": "x"}})
    at = datetime.now()
    if tamper == "stale":
        at -= timedelta(minutes=6)
    headers = signed_headers(secret, "msg_1", payload, at)
    if tamper == "signature":
        headers = signed_headers(new_webhook_secret(), "msg_1", payload, at)
    elif tamper == "body":
        payload = payload.replace('"x"', '"y"')
    elif tamper == "no_headers":
        headers = {"content-type": "application/json"}
    elif tamper == "bad_header":
        headers["webhook-signature"] = "garbage"
    answer = wallet.client().post("/api/v1/bank/webhooks", data=payload, headers=headers)
    assert answer.status_code == 401, answer.get_json()
    assert _events(wallet) == 0


def test_a_callback_is_answered_ahead_of_flask_as_flask_answers_it(
    wallet: Wallet, bank: Bank
) -> None:
    """The bank's callback — one every top-up — is answered in plain WSGI
    (``SignedWebhooksFirst``), no Flask request run for it, and each answer is the one
    Flask's route gives, byte for byte: stored, a duplicate, forged, not JSON, not an event
    we know, larger than a callback is. Larger than any request body may be: refused unread,
    as every endpoint refuses one (422)."""
    from flask import request_started
    from werkzeug.test import Client

    from wallet_service.api.framework import request_body_bytes_max

    secret = new_webhook_secret()
    wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    fast, by_flask = wallet.client(), Client(wallet.app.wsgi_app.inner)
    flask_requests: list[str] = []

    def started(_app, **_extra) -> None:  # type: ignore[no-untyped-def]
        from flask import request

        flask_requests.append(request.method)

    def post(client: Any, webhook_id: str, payload: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        signed = signed_headers(secret, webhook_id, payload, datetime.now())
        answer = client.post("/api/v1/bank/webhooks", data=payload, headers=headers or signed)
        return answer.status_code, answer.headers["Content-Type"], answer.get_data()

    event_body = json.dumps(
        {"type": "payment.succeeded", "data": {"order_id": "o", "payment_id": "p", "amount_fen": 1}}
    )
    request_started.connect(started, wallet.app)
    try:
        stored = post(fast, "msg_fast", event_body)
        stored_by_flask = post(by_flask, "msg_flask", event_body)
        assert stored == (200, "application/json", b'{"duplicate":false,"webhook_id":"msg_fast"}\n')
        assert stored_by_flask == (stored[0], stored[1], stored[2].replace(b"fast", b"flask"))
        forged = signed_headers(new_webhook_secret(), "msg_x", event_body, datetime.now())
        for webhook_id, payload, headers, status, expected in (
            ("msg_fast", event_body, None, 200, {"duplicate": True, "webhook_id": "msg_fast"}),
            ("msg_x", event_body, forged, 401, "unauthorized"),
            ("msg_y", "{not json", None, 422, "invalid_input"),
            (
                "msg_z",
                json.dumps({"type": "payment.failed", "data": {}}),
                None,
                422,
                "invalid_input",
            ),
            ("msg_big", json.dumps({"pad": "x" * 100_000}), None, 422, "invalid_input"),
        ):
            answer = post(fast, webhook_id, payload, headers)
            body = json.loads(answer[2])
            assert answer[0] == status, answer
            assert body == expected if status == 200 else body["error"]["code"] == expected
            assert answer == post(by_flask, webhook_id, payload, headers), webhook_id
        too_large = post(fast, "msg_huge", "x" * (request_body_bytes_max + 1))
        assert too_large[0] == 422 and json.loads(too_large[2])["error"]["code"] == "invalid_input"
        assert fast.get("/api/v1/bank/webhooks").status_code == 405  # (Flask's)
    finally:
        request_started.disconnect(started, wallet.app)
    assert flask_requests == ["POST"] * 6 + ["GET"]  # those sent to Flask on purpose only
    assert _events(wallet) == 2


@pytest.fixture
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """Set before the platform process starts (it reads WALLET_BANK_WEBHOOK_SECRET)."""
    secret = new_webhook_secret()
    monkeypatch.setenv("WALLET_BANK_WEBHOOK_SECRET", secret)
    return secret


def test_bank_serve_calls_back_the_running_platform(  # type: ignore[no-untyped-def]
    webhook_secret: str, sqlite_service, tmp_path: Path
) -> None:
    base, env = sqlite_service
    bank_port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "app.py"),
            "bank",
            "serve",
            "--port",
            str(bank_port),
            "--db",
            str(tmp_path / "bank.sqlite"),
            "--merchant",
            f"{MERCHANT}={base}/api/v1/bank/webhooks",
        ],
        env={**os.environ, "BANK_WEBHOOK_SECRET": webhook_secret},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    database = Path(env["WALLET_INSTANCE_DIR"]) / "wallet.sqlite"
    try:
        bank_url = f"http://127.0.0.1:{bank_port}/api"
        assert wait_until_up(f"{bank_url}/webhooks", 20), "the bank did not come up"
        requests.post(
            f"{bank_url}/cards",
            json={"number": CARD, "holder": "Li Lei", "balance_fen": 5000},
            timeout=5,
        )
        paid = requests.post(
            f"{bank_url}/payments",
            json={"merchant": MERCHANT, "order_id": "o1", "amount_fen": 1200, "card_number": CARD},
            timeout=5,
        )
        assert paid.status_code == 201
        assert (
            requests.post(
                f"{bank_url}/payments", json={"merchant": MERCHANT}, timeout=5
            ).status_code
            == 422
        )
        deadline = time.monotonic() + 20
        while _stored_events(database) == 0:
            assert time.monotonic() < deadline, "the platform never stored the callback"
            time.sleep(0.05)
        log = requests.get(f"{bank_url}/webhooks", timeout=5).json()
        assert log[0]["delivered_at"] and log[0]["last_status"] == 200
        _reconcile_from_the_bank(env, f"http://127.0.0.1:{bank_port}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        process.stderr.close()  # type: ignore[union-attr]
    assert process.returncode == 0 and _stored_events(database) == 1


def _reconcile_from_the_bank(env: dict[str, str], bank: str) -> None:
    """``topups reconcile`` fetches the day's statement from the bank: a payment for an
    order the platform never made is a finding (exit 1); a statement file the bank would
    not write is refused (exit 2); a bank that does not answer says so (exit 1)."""
    from datetime import date

    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "app.py")]
    reconcile = [*command, "topups", "reconcile", "--date", date.today().isoformat()]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*reconcile, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
        )

    found = run("--bank", bank, "--merchant", MERCHANT)
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["bank_paid_fen"] == 1200 and report["findings"] == [
        {"kind": "paid_unknown_order", "order": "O1", "bank_net_fen": 1200}
    ]
    quiet_day = run("--statement", "-", stdin="kind,id,payment_id,order_id,amount_fen,at\r\n")
    assert quiet_day.returncode == 0 and json.loads(quiet_day.stdout)["matched"]
    undated = subprocess.run(
        [*command, "topups", "reconcile", "--statement", "-"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert undated.returncode == 2 and "--statement needs --date" in undated.stderr
    bad = run("--statement", "-", stdin="kind,id\n")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: a statement's header")
    down = run("--bank", f"http://127.0.0.1:{_free_port()}")
    assert down.returncode == 1 and "could not be fetched" in down.stderr
    assert "Traceback" not in found.stderr + bad.stderr + down.stderr


def _stored_events(database: Path) -> int:
    import sqlite3

    with sqlite3.connect(database) as db:
        count = db.execute("SELECT count(*) FROM bank_webhook_events").fetchone()[0]
    db.close()
    return count


def test_a_stored_callback_wakes_the_workers_on_postgresql(pg_wallet: Wallet, bank: Bank) -> None:
    """The worker LISTENs; a stored callback NOTIFYs at commit (a duplicate stores nothing
    and wakes no one)."""
    from wallet_service.services.bank_webhooks import WORK_CHANNEL

    secret = new_webhook_secret()
    pg_wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    delivered: list[tuple[str, str, dict[str, str]]] = []

    def deliver(url: str, payload: str, headers: dict[str, str]) -> int:
        delivered.append((url, payload, headers))
        return _deliver_to(pg_wallet)(url, payload, headers)

    with listening_for_work(pg_wallet) as listener:
        bank.pay(MERCHANT, "order-1", 3000, CARD)
        assert deliver_due(bank, secret, deliver) == 1
        woke = list(listener.notifies(timeout=2.0, stop_after=1))
        assert [n.channel for n in woke] == [WORK_CHANNEL]
        assert list(listener.notifies(timeout=0.2)) == []
        assert deliver(*delivered[0]) == 200  # the same callback again: a twin
        assert list(listener.notifies(timeout=0.5)) == []


def test_a_merchant_url_the_sender_cannot_read_holds_up_no_other_callback(bank: Bank) -> None:
    """(A URL that failed before its request — a broken IPv6 literal — once escaped the
    sender's pass: that webhook stayed first in line, and no later one ever left.)"""
    import http.server

    from reader_sim.bank_http import WebhookSender

    got: list[str] = []

    class Platform(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # (http.server names it so)
            got.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    with serving(Platform) as platform:
        bank.add_merchant("BROKEN", "http://[::1/callbacks")
        bank.add_merchant("GOOD", f"{platform}/callbacks")
        bank.open_card("6222020000000002", "Han Meimei", 10_000)
        bank.pay("BROKEN", "order-1", 100, CARD)
        bank.pay("GOOD", "order-2", 100, "6222020000000002")
        sender = WebhookSender(bank, new_webhook_secret())
        assert deliver_due(bank, sender.secret, sender._post) == 1
    assert [json.loads(body)["data"]["order_id"] for body in got] == ["order-2"]


def test_the_sender_posts_due_webhooks_at_once(bank: Bank) -> None:
    """Each answer is held until three requests are in: one at a time, the first would
    wait out the barrier and fail (a serial sender was busy 96 % of the time under load,
    mostly waiting for the platform's answers)."""
    import http.server
    import threading

    from reader_sim.bank_http import WebhookSender

    all_in = threading.Barrier(3, timeout=5)

    class Platform(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # (http.server names it so)
            self.rfile.read(int(self.headers["Content-Length"]))
            try:
                all_in.wait()
                self.send_response(204)
            except threading.BrokenBarrierError:
                self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    with serving(Platform) as platform:
        bank.add_merchant(MERCHANT, f"{platform}/callbacks")
        for order in ("order-1", "order-2", "order-3"):
            bank.pay(MERCHANT, order, 100, CARD)
        sender = WebhookSender(bank, new_webhook_secret())
        assert deliver_due(bank, sender.secret, sender._post, sender._posting.map) == 3
    assert [row["last_status"] for row in bank.webhook_log()] == [204, 204, 204]


def test_due_webhooks_are_found_by_an_index_not_by_reading_them_all(bank: Bank) -> None:
    """(The sender looks on every payment: a long-running bank holds every webhook it
    ever sent.)"""
    from reader_sim.bank import _DUE_WEBHOOKS

    plan = bank._execute(f"EXPLAIN QUERY PLAN {_DUE_WEBHOOKS}", (12, "2026-12-01"))
    assert any("USING INDEX webhooks_due (" in row[-1] for row in plan), plan


def test_refunds_and_statements_are_the_merchants_requests_signed_with_its_secret(
    bank: Bank,
) -> None:
    """(They were open to anyone who could reach the bank: a refund of any payment, any
    merchant's statement.)"""
    from reader_sim.bank import signed_request_headers
    from reader_sim.bank_http import create_bank_app

    secret = new_webhook_secret()
    client = create_bank_app(bank, secret).test_client()
    payment = bank.pay(MERCHANT, "order-1", 3000, CARD)
    body = json.dumps(
        {"payment_id": payment.id, "amount_fen": 1000, "refund_key": "r1", "reason": ""}
    )
    now = datetime.now()
    for headers in (
        {"content-type": "application/json"},  # unsigned
        signed_request_headers(new_webhook_secret(), body, now),  # another secret
        signed_request_headers(secret, body, now - timedelta(minutes=6)),  # stale
        signed_request_headers(secret, body.replace("1000", "3000"), now),  # another body
    ):
        refused = client.post("/api/refunds", data=body, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json["error"]["code"] == "unauthenticated"
    assert bank.card_balance(CARD) == 10_000 - 3000  # nothing refunded
    signed = client.post(
        "/api/refunds", data=body, headers=signed_request_headers(secret, body, now)
    )
    assert signed.status_code == 201 and bank.card_balance(CARD) == 10_000 - 2000
    today = bank.clock().date()  # (the fixture's clock: not the next day at midnight)
    target = f"/api/statements/{MERCHANT}/{today}.csv"
    assert client.get(target).status_code == 401
    other_day = f"/api/statements/{MERCHANT}/{today - timedelta(days=1)}.csv"
    signed_for_another = signed_request_headers(secret, other_day, now)
    assert client.get(target, headers=signed_for_another).status_code == 401
    statement = client.get(target, headers=signed_request_headers(secret, target, now))
    assert statement.status_code == 200 and "order-1" in statement.get_data(as_text=True)


def test_a_payment_over_http_pays_once_and_bad_ones_change_nothing(bank: Bank) -> None:
    """``POST /api/payments`` (answered ahead of Flask): a good payment is paid once — the
    same order again answers the same payment — and every malformed one is refused with the
    bank's error shape, nothing paid."""
    from reader_sim.bank_http import create_bank_app

    told = []
    client = create_bank_app(bank, new_webhook_secret(), lambda: told.append(1)).test_client()
    good = {"merchant": MERCHANT, "order_id": "o-1", "amount_fen": 1200, "card_number": CARD}
    malformed: list[tuple[Any, dict[str, str]]] = [
        ({**good, "amount_fen": "1200"}, {}),  # a string: not converted
        ({**good, "amount_fen": 12.5}, {}),  # not a whole number of fen
        ({**good, "amount_fen": True}, {}),
        ({**good, "order_id": 7}, {}),
        ({k: v for k, v in good.items() if k != "card_number"}, {}),
        ([good], {}),  # not an object
        (json.dumps(good), {"Content-Type": "text/plain"}),  # not said to be JSON
        ('{"merchant": ', {"Content-Type": "application/json"}),  # not JSON
        ({**good, "order_id": "x" * 5000}, {}),  # larger than a payment is
    ]
    for body, headers in malformed:
        if isinstance(body, str):
            refused = client.post("/api/payments", data=body, headers=headers)
        else:
            refused = client.post("/api/payments", json=body)
        assert refused.status_code == 422, body
        assert refused.json["error"]["code"] == "invalid_body", body
    for refusal, code in (
        ({**good, "amount_fen": 0}, "invalid_amount"),
        ({**good, "card_number": "6222020000000999"}, "unknown_card"),
        ({**good, "merchant": "NOBODY"}, "unknown_merchant"),
        ({**good, "amount_fen": 10_001}, "insufficient_funds"),
    ):
        refused = client.post("/api/payments", json=refusal)
        assert (refused.status_code, refused.json["error"]["code"]) == (422, code)
    assert bank.card_balance(CARD) == 10_000 and not told  # nothing paid, nothing to call back

    paid = client.post("/api/payments", json=good)
    assert paid.status_code == 201 and paid.headers["Content-Type"] == "application/json"
    again = client.post("/api/payments", json=good)
    assert again.status_code == 201 and again.json == paid.json
    assert paid.json["amount_fen"] == 1200 and paid.json["order_id"] == "o-1"
    assert datetime.fromisoformat(paid.json["paid_at"]) == bank.clock()
    conflict = client.post("/api/payments", json={**good, "amount_fen": 1300})
    assert (conflict.status_code, conflict.json["error"]["code"]) == (409, "order_conflict")
    assert bank.card_balance(CARD) == 10_000 - 1200 and bank.merchant_balance(MERCHANT) == 1200
    assert told  # the sender was woken for the payment's callback

    looked = client.get("/api/payments")
    assert looked.status_code == 405 and looked.headers["Allow"] == "POST"
    assert client.get("/api/webhooks").status_code == 200  # the rest is Flask's still


@pytest.fixture
def eight_hours_east_of_utc() -> Iterator[None]:
    """The process's local time zone UTC+8, as China's (POSIX form: no tzdata needed)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "CST-8"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.usefixtures("eight_hours_east_of_utc")
def test_signatures_made_on_a_host_not_on_utc_verify() -> None:
    """(Given a naive local time, the library signed it as UTC while the header said local
    time: on a host in China, no callback or request verified.)"""
    from reader_sim.bank import request_signed, signed_request_headers

    secret = new_webhook_secret()
    now = datetime.now()
    headers = signed_headers(secret, "msg_1", '{"type": "x"}', now)
    assert Webhook(secret).verify('{"type": "x"}', headers) == {"type": "x"}
    assert request_signed(secret, b"/api/x", signed_request_headers(secret, "/api/x", now))


def test_the_platforms_bank_client_signs_what_the_bank_checks(bank: Bank) -> None:
    """Against the bank's own app: the worker's refunds and reconcile's statements are
    taken signed with the shared secret; under another, refused — and the platform takes
    that for its own set-up, to ask again, saying what to check."""
    import threading

    from werkzeug.serving import make_server

    from reader_sim.bank_http import create_bank_app
    from wallet_service.services import topups
    from wallet_service.worker import SIGNATURE_REFUSED, HttpBankClient

    secret = new_webhook_secret()
    server = make_server("127.0.0.1", 0, create_bank_app(bank, secret), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        payment = bank.pay(MERCHANT, "order-1", 3000, CARD)
        with pytest.raises(topups.BankBusy, match="refused the request's signature") as busy:
            HttpBankClient(base, new_webhook_secret()).refund(payment.id, 1000, "", "r1")
        assert str(busy.value) == SIGNATURE_REFUSED
        assert bank.card_balance(CARD) == 10_000 - 3000
        client = HttpBankClient(base, secret)
        assert client.refund(payment.id, 1000, "", "r1")
        assert bank.card_balance(CARD) == 10_000 - 2000
        assert "order-1" in client.statement(MERCHANT, bank.clock().date())
    finally:
        server.shutdown()
        server.server_close()
