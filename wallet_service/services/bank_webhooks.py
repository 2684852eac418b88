"""Bank callbacks (Standard Webhooks): verified on the raw body, at most 5 minutes old,
deduplicated by webhook-id, and stored before they are acknowledged — so a callback the
bank retries, or one that arrives twice, is processed once; a forged one changes nothing.

The stored events drive the top-up orders (OTA issue §5): ``payment.succeeded`` pays an
order, ``refund.succeeded`` confirms a refund.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from wallet_service.errors import InvalidInput, Unauthorized
from wallet_service.models import BankWebhookEvent, TopUpOrder
from wallet_service.services.registry import Context

KNOWN_EVENTS = ("payment.succeeded", "refund.succeeded")
payload_bytes_max = 64_000
id_chars_max = TopUpOrder.__table__.c.payment_id.type.length  # the orders' column
# An order id the platform never made is still taken (its money goes back), up to this
order_id_chars_max = 100
amount_fen_max = 10**12  # ten billion yuan: a sane bound for one payment


@dataclass(frozen=True)
class EventData:
    """A known event's ``data``, checked."""

    order_id: str
    payment_id: str
    amount_fen: int
    paid_at: datetime | None  # the platform's local time; None: the bank did not say


def event_data(payload: Any) -> EventData:
    """The ``data`` of a known event, checked: the ids the orders are found by, a positive
    whole amount in fen, when it was paid. Checked before a callback is acknowledged (the
    bank then retries or someone looks: nothing unusable is stored) and again as a stored
    one is applied."""
    if not isinstance(payload, dict) or payload.get("type") not in KNOWN_EVENTS:
        raise InvalidInput(f"a webhook event's type is one of {', '.join(KNOWN_EVENTS)}")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise InvalidInput("a webhook event carries a data object")
    for field, chars_max in (("order_id", order_id_chars_max), ("payment_id", id_chars_max)):
        value = data.get(field)
        if not isinstance(value, str) or not 0 < len(value) <= chars_max:
            raise InvalidInput(f"data.{field} is a string of 1..{chars_max} characters")
    amount = data.get("amount_fen")
    if type(amount) is not int or not 0 < amount <= amount_fen_max:
        raise InvalidInput(f"data.amount_fen is a whole number of fen, 1..{amount_fen_max}")
    return EventData(data["order_id"], data["payment_id"], amount, _paid_at(data))


def _paid_at(data: dict[str, Any]) -> datetime | None:
    """When the bank says a payment was made (its business day is reconciliation's), in
    the platform's local time; None when the callback does not say."""
    value = data.get("paid_at")
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None:
        raise InvalidInput("data.paid_at is an ISO 8601 time, like 2026-11-30T10:00:00")
    return at if at.tzinfo is None else at.astimezone().replace(tzinfo=None)


def receive(
    ctx: Context, secret: str | None, raw_body: bytes, headers: dict[str, str]
) -> dict[str, Any]:
    if not secret:
        raise Unauthorized("the platform has no bank webhook secret configured")
    if len(raw_body) > payload_bytes_max:
        raise InvalidInput(f"a webhook body is at most {payload_bytes_max} bytes")
    try:
        raw_body.decode("utf-8")  # (the library decodes before it checks the signature)
    except UnicodeDecodeError:
        raise InvalidInput("a webhook body is JSON in UTF-8") from None
    try:
        # Checks the HMAC over id.timestamp.body and the 5-minute timestamp tolerance,
        # then parses the body (a JSON error: the signature was good).
        payload = Webhook(secret).verify(raw_body, headers)
    except json.JSONDecodeError as error:
        raise InvalidInput(f"a webhook body is JSON: {error}") from None
    except (WebhookVerificationError, ValueError, TypeError) as error:
        raise Unauthorized(f"webhook signature rejected: {error}") from None
    webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
    event_data(payload)
    if len(webhook_id) > 100:
        raise InvalidInput("webhook-id too long")
    row = {
        "id": webhook_id,
        "event_type": payload["type"],
        "payload": json.dumps(payload),
        "received_at": ctx.now,
    }
    if not _stored_once(ctx.session, row):
        return {"webhook_id": webhook_id, "duplicate": True}
    return {"webhook_id": webhook_id, "duplicate": False}


WORK_CHANNEL = "wallet_work"


def _store_once_statement(dialect_insert, wakes_workers: bool):  # type: ignore[no-untyped-def]
    """INSERT … ON CONFLICT (id) DO NOTHING: a twin delivered at the same moment waits for
    the first's commit, then stores nothing. On PostgreSQL it wakes the OTA workers in the
    same statement (LISTEN/NOTIFY, delivered at commit — never for a rolled-back event, nor
    for a twin, which returns no row to notify for). Built once: built per callback, the
    statement's expression tree and cache key cost more CPU than running it."""
    table = BankWebhookEvent.__table__
    stored = (
        dialect_insert(table)
        .values({column.key: bindparam(column.key) for column in _STORED_COLUMNS})
        .on_conflict_do_nothing(index_elements=[table.c.id])
        .returning(table.c.id)
    )
    if not wakes_workers:
        return stored
    inserted = stored.cte("stored")
    return select(inserted.c.id, func.pg_notify(WORK_CHANNEL, "")).select_from(inserted)


_STORED_COLUMNS = [
    BankWebhookEvent.__table__.c[name] for name in ("id", "event_type", "payload", "received_at")
]
_STORE_ONCE = {
    "postgresql": _store_once_statement(postgresql_insert, wakes_workers=True),
    "sqlite": _store_once_statement(sqlite_insert, wakes_workers=False),  # (the workers poll)
}


_NOTIFY_WORK = text(f"NOTIFY {WORK_CHANNEL}")


def wake_workers(session: Any) -> None:
    """Work due now that no callback brought (an order to start again from packet 1): the
    OTA workers' due loops wake as this transaction commits (PostgreSQL; on SQLite they
    poll), not at their next idle poll."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NOTIFY_WORK)


def _stored_once(session: Any, row: dict[str, Any]) -> bool:
    """Store the event unless its webhook-id is stored already: one statement."""
    statement = _STORE_ONCE[session.get_bind().dialect.name]
    return session.execute(statement, row).first() is not None
