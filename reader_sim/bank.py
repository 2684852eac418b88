"""A small bank, simulated for top-ups (ota.md §5, wallet issue §4): accounts and bank cards,
payments to a merchant (the operator's platform), refunds, a daily statement, and signed
callbacks per the Standard Webhooks spec, retried with backoff until answered 2xx.

``reader_sim`` holds the simulated world around the platform: readers, phones, the SMS
centre and this bank. The core here keeps state in SQLite and takes its clock as an
argument; ``BankApp``/``app.py bank serve`` put HTTP around it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
import logging
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from reader_sim.sqlite_tx import immediate

log = logging.getLogger(__name__)

webhook_attempts_max = 12
webhook_backoff_first_s = 1
webhook_backoff_max_s = 3600
payment_amount_fen_max = 100_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (number TEXT PRIMARY KEY, holder TEXT NOT NULL,
    balance_fen INTEGER NOT NULL CHECK (balance_fen >= 0));
CREATE TABLE IF NOT EXISTS merchants (id TEXT PRIMARY KEY, callback_url TEXT NOT NULL,
    balance_fen INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, merchant TEXT NOT NULL,
    order_id TEXT NOT NULL, amount_fen INTEGER NOT NULL, card_number TEXT NOT NULL,
    refunded_fen INTEGER NOT NULL DEFAULT 0, paid_at TEXT NOT NULL,
    UNIQUE (merchant, order_id));
CREATE TABLE IF NOT EXISTS refunds (id TEXT PRIMARY KEY, payment_id TEXT NOT NULL,
    refund_key TEXT NOT NULL UNIQUE, amount_fen INTEGER NOT NULL, reason TEXT NOT NULL,
    refunded_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhooks (id TEXT PRIMARY KEY, merchant TEXT NOT NULL,
    event_type TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL, delivered_at TEXT, last_status INTEGER);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (next_attempt_at)
    WHERE delivered_at IS NULL;
"""


_DUE_WEBHOOKS = (  # (by the index webhooks_due: a long-running bank keeps all it sent)
    "SELECT w.id, m.callback_url, w.payload, w.merchant FROM webhooks w "
    "JOIN merchants m ON m.id = w.merchant WHERE w.delivered_at IS NULL "
    "AND w.attempts < ? AND w.next_attempt_at <= ? ORDER BY w.next_attempt_at"
)


class BankRefused(Exception):
    """A request the bank declines: unknown card, insufficient funds, over-refund…"""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Payment:
    id: str
    merchant: str
    order_id: str
    amount_fen: int
    card_number: str
    refunded_fen: int
    paid_at: datetime


class Bank:
    def __init__(self, path: str | Path, clock: Callable[[], datetime] = datetime.now) -> None:
        self.clock = clock
        # One connection shared by the HTTP threads and the webhook sender: every statement,
        # and every transaction as a whole, holds the lock (a connection has one transaction).
        self._connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock, immediate(self._connection):
            yield

    def _execute(self, sql: str, parameters: tuple = ()) -> list[Any]:
        """The rows, fetched while the lock is held."""
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    def _one(self, sql: str, parameters: tuple = ()) -> Any:
        rows = self._execute(sql, parameters)
        return rows[0] if rows else None

    # --- set-up -------------------------------------------------------------------------

    def open_card(self, number: str, holder: str, balance_fen: int) -> None:
        if not number.isdigit() or not 12 <= len(number) <= 19 or balance_fen < 0:
            raise BankRefused("invalid_card", "a card number is 12–19 digits, balance ≥ 0")
        with self._transaction():
            self._execute(
                "INSERT OR REPLACE INTO cards VALUES (?,?,?)", (number, holder, balance_fen)
            )

    def add_merchant(self, merchant: str, callback_url: str) -> None:
        with self._transaction():
            self._execute(
                "INSERT INTO merchants (id, callback_url) VALUES (?,?) "
                "ON CONFLICT(id) DO UPDATE SET callback_url = excluded.callback_url",
                (merchant, callback_url),
            )

    def card_balance(self, number: str) -> int:
        row = self._one("SELECT balance_fen FROM cards WHERE number = ?", (number,))
        if row is None:
            raise BankRefused("unknown_card", "no such card")
        return row[0]

    def merchant_balance(self, merchant: str) -> int:
        return self._one("SELECT balance_fen FROM merchants WHERE id = ?", (merchant,))[0]

    # --- money --------------------------------------------------------------------------

    def pay(self, merchant: str, order_id: str, amount_fen: int, card_number: str) -> Payment:
        """Pay a merchant's order once: the same order again returns the same payment;
        the same order with another amount or card is refused."""
        if not 0 < amount_fen <= payment_amount_fen_max:
            raise BankRefused("invalid_amount", f"amount is 1..{payment_amount_fen_max} fen")
        with self._transaction():
            existing = self._payment_for(merchant, order_id)
            if existing is not None:
                if (existing.amount_fen, existing.card_number) != (amount_fen, card_number):
                    raise BankRefused("order_conflict", "this order was paid differently")
                return existing
            if self._one("SELECT 1 FROM merchants WHERE id = ?", (merchant,)) is None:
                raise BankRefused("unknown_merchant", "no such merchant")
            balance = self.card_balance(card_number)
            if balance < amount_fen:
                raise BankRefused("insufficient_funds", "insufficient funds")
            payment = Payment(
                "pay_" + secrets.token_hex(8),
                merchant,
                order_id,
                amount_fen,
                card_number,
                0,
                self.clock().replace(microsecond=0),
            )
            self._execute(
                "UPDATE cards SET balance_fen = balance_fen - ? WHERE number = ?",
                (amount_fen, card_number),
            )
            self._execute(
                "UPDATE merchants SET balance_fen = balance_fen + ? WHERE id = ?",
                (amount_fen, merchant),
            )
            self._execute(
                "INSERT INTO payments VALUES (?,?,?,?,?,0,?)",
                (
                    payment.id,
                    merchant,
                    order_id,
                    amount_fen,
                    card_number,
                    payment.paid_at.isoformat(),
                ),
            )
            self._enqueue(
                merchant,
                "payment.succeeded",
                {
                    "payment_id": payment.id,
                    "order_id": order_id,
                    "amount_fen": amount_fen,
                    "paid_at": payment.paid_at.isoformat(),
                },
            )
            return payment

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str:
        """Refund (part of) a payment once per ``refund_key``; never more than was paid."""
        with self._transaction():
            row = self._one("SELECT id FROM refunds WHERE refund_key = ?", (refund_key,))
            if row is not None:
                return row[0]
            payment = self._payment(payment_id)
            if not 0 < amount_fen <= payment.amount_fen - payment.refunded_fen:
                raise BankRefused("invalid_amount", "refund exceeds what remains of the payment")
            refund_id = "ref_" + secrets.token_hex(8)
            now = self.clock().replace(microsecond=0)
            self._execute(
                "UPDATE payments SET refunded_fen = refunded_fen + ? WHERE id = ?",
                (amount_fen, payment_id),
            )
            self._execute(
                "UPDATE cards SET balance_fen = balance_fen + ? WHERE number = ?",
                (amount_fen, payment.card_number),
            )
            self._execute(
                "UPDATE merchants SET balance_fen = balance_fen - ? WHERE id = ?",
                (amount_fen, payment.merchant),
            )
            self._execute(
                "INSERT INTO refunds VALUES (?,?,?,?,?,?)",
                (refund_id, payment_id, refund_key, amount_fen, reason, now.isoformat()),
            )
            self._enqueue(
                payment.merchant,
                "refund.succeeded",
                {
                    "refund_id": refund_id,
                    "payment_id": payment_id,
                    "order_id": payment.order_id,
                    "amount_fen": amount_fen,
                    "refunded_at": now.isoformat(),
                },
            )
            return refund_id

    def _payment_for(self, merchant: str, order_id: str) -> Payment | None:
        row = self._one(
            "SELECT * FROM payments WHERE merchant = ? AND order_id = ?", (merchant, order_id)
        )
        return None if row is None else _payment(row)

    def _payment(self, payment_id: str) -> Payment:
        row = self._one("SELECT * FROM payments WHERE id = ?", (payment_id,))
        if row is None:
            raise BankRefused("unknown_payment", "no such payment")
        return _payment(row)

    def statement(self, merchant: str, day: date) -> str:
        """The merchant's daily statement: every payment and refund of the day, as CSV."""
        start, end = day.isoformat(), (day + timedelta(days=1)).isoformat()
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["kind", "id", "payment_id", "order_id", "amount_fen", "at"])
        for row in self._execute(
            "SELECT 'payment', id, id, order_id, amount_fen, paid_at FROM payments "
            "WHERE merchant = ? AND paid_at >= ? AND paid_at < ? "
            "UNION ALL SELECT 'refund', r.id, r.payment_id, p.order_id, -r.amount_fen, "
            "r.refunded_at FROM refunds r JOIN payments p ON p.id = r.payment_id "
            "WHERE p.merchant = ? AND r.refunded_at >= ? AND r.refunded_at < ? ORDER BY 6, 2",
            (merchant, start, end, merchant, start, end),
        ):
            writer.writerow(row)
        return out.getvalue()

    # --- webhooks -----------------------------------------------------------------------

    def _enqueue(self, merchant: str, event_type: str, data: dict[str, Any]) -> None:
        webhook_id = "msg_" + secrets.token_hex(12)
        payload = json.dumps(
            {"type": event_type, "timestamp": self.clock().isoformat(), "data": data},
            separators=(",", ":"),
        )
        self._execute(
            "INSERT INTO webhooks (id, merchant, event_type, payload, next_attempt_at) "
            "VALUES (?,?,?,?,?)",
            (webhook_id, merchant, event_type, payload, self.clock().isoformat()),
        )

    def due_webhooks(self) -> list[tuple[str, str, str, str]]:
        """(webhook id, callback url, payload, merchant) of undelivered webhooks now due."""
        return self._execute(_DUE_WEBHOOKS, (webhook_attempts_max, self.clock().isoformat()))

    def record_attempts(self, answered: list[tuple[str, int | None]]) -> None:
        """Each webhook's attempt, with the HTTP status it got (None: unreachable): a 2xx
        delivers it, anything else makes it due again after its backoff. One transaction."""
        now = self.clock()
        with self._transaction():
            for webhook_id, status in answered:
                attempts = self._one("SELECT attempts FROM webhooks WHERE id = ?", (webhook_id,))
                self._record(webhook_id, attempts[0] + 1, status, now)

    def _record(self, webhook_id: str, attempts: int, status: int | None, now: datetime) -> None:
        if status is not None and 200 <= status < 300:
            self._execute(
                "UPDATE webhooks SET attempts = ?, last_status = ?, delivered_at = ? WHERE id = ?",
                (attempts, status, now.isoformat(), webhook_id),
            )
            return
        delay = min(webhook_backoff_first_s * 2 ** (attempts - 1), webhook_backoff_max_s)
        self._execute(
            "UPDATE webhooks SET attempts = ?, last_status = ?, next_attempt_at = ? WHERE id = ?",
            (attempts, status, (now + timedelta(seconds=delay)).isoformat(), webhook_id),
        )

    def webhook_log(self) -> list[dict[str, Any]]:
        rows = self._execute(
            "SELECT id, event_type, attempts, last_status, delivered_at FROM webhooks "
            "ORDER BY next_attempt_at"
        )
        return [
            dict(zip(("id", "type", "attempts", "last_status", "delivered_at"), r, strict=True))
            for r in rows
        ]


def _payment(row: tuple) -> Payment:
    return Payment(row[0], row[1], row[2], row[3], row[4], row[5], datetime.fromisoformat(row[6]))


def signed_headers(secret: str, webhook_id: str, payload: str, at: datetime) -> dict[str, str]:
    """Standard Webhooks headers: webhook-id, webhook-timestamp, and
    webhook-signature = v1,base64(HMAC-SHA256(key, id.timestamp.body)). ``at`` naive is
    local time (the library's ``sign`` would read it as UTC: on a host not on UTC, the
    header's time and the signed one differed by the offset, and nothing verified)."""
    at = at.astimezone(UTC)
    signature = Webhook(secret).sign(webhook_id, at, payload)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def signed_request_headers(secret: str, payload: str, at: datetime) -> dict[str, str]:
    """A merchant's request to the bank's API, signed as the bank signs its callbacks (the
    same headers, HMAC and secret; project-defined): ``payload`` is the body, or for a GET
    the request target. A fresh id each (the bank does not keep them: a refund is once
    per key, a statement only read)."""
    return signed_headers(secret, f"req_{secrets.token_hex(12)}", payload, at)


def request_signed(secret: str, payload: bytes, headers: dict[str, str]) -> bool:
    """Whether ``payload`` came with a good signature under ``secret``, at most 5 minutes
    old (the Standard Webhooks tolerance)."""
    try:
        Webhook(secret).verify(payload, headers, json_parse=False)
    except (WebhookVerificationError, ValueError, TypeError, KeyError):
        return False
    return True


def deliver_due(
    bank: Bank,
    secret: str,
    post: Callable[[str, str, dict[str, str]], int | None],
    post_all: Callable[[Callable, list], Iterable] = map,
) -> int:
    """One pass of the sender: POST every due webhook (``post`` returns the HTTP status or
    None when unreachable) by ``post_all`` (a ``map``: one by one, or on threads); record
    the attempts together; count delivered. The loop and the transport are the caller's.
    A ``post`` that raises counts as unreachable (logged): every attempt is recorded."""
    due = bank.due_webhooks()

    def attempt(webhook: tuple[str, str, str, str]) -> int | None:
        webhook_id, url, payload, _ = webhook
        try:
            return post(url, payload, signed_headers(secret, webhook_id, payload, bank.clock()))
        except Exception:
            log.exception("webhook %s: its delivery failed unexpectedly", webhook_id)
            return None

    statuses = list(post_all(attempt, due))
    ids = [webhook_id for webhook_id, _, _, _ in due]
    bank.record_attempts(list(zip(ids, statuses, strict=True)))
    return sum(status is not None and 200 <= status < 300 for status in statuses)


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


WEBHOOK_SECRET_PREFIX = "whsec_"
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` ‖ base64 of the key (RFC 4648
    §4, padding optional). Stricter than ``standardwebhooks.Webhook``, which takes any
    prefix-less string, drops characters outside the alphabet and fails only when it signs
    or verifies: a secret the two sides could read differently is refused here, at start.
    ValueError says what is wrong, never what the secret is."""
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    rule = f"a webhook secret is {WEBHOOK_SECRET_PREFIX} followed by the key in base64"
    if encoded == secret:
        raise ValueError(f"{rule}: this one does not start with {WEBHOOK_SECRET_PREFIX}")
    if not _BASE64.fullmatch(encoded) or len(encoded.rstrip("=")) % 4 == 1:
        raise ValueError(f"{rule} (A-Z a-z 0-9 + /, = padding): this one is not base64")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"{rule}: this one is not base64") from None
    if not key:
        raise ValueError(f"{rule}: this one is empty")
    return key
