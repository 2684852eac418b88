"""Idempotency keys for every money-moving call.

Same key and same body → the stored answer again, nothing done twice. Same key with a
different body → 409. The answer is stored in the same transaction as the work, so a
crash leaves either both or neither.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from wallet_service.errors import Conflict, InvalidInput
from wallet_service.models import IdempotencyKey

key_chars_max = 100


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _serialize_twins(session: Session, principal: str, key: str) -> None:
    """Two requests with one key wait for each other, so the second sees the first's stored
    answer. PostgreSQL: a transaction-level advisory lock on the key's hash. SQLite: every
    write transaction is already exclusive (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        lock_id = int.from_bytes(
            hashlib.sha256(f"{principal}\0{key}".encode()).digest()[:8], "big", signed=True
        )
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})


def once(
    session: Session,
    *,
    principal: str,
    key: str | None,
    body: Any,
    at: datetime,
    work: Callable[[], tuple[int, Any]],
) -> tuple[int, Any]:
    """Run ``work`` (which returns (HTTP status, JSON body)) at most once per key."""
    if not key:
        raise InvalidInput("money-moving calls need an Idempotency-Key header")
    if len(key) > key_chars_max:
        raise InvalidInput(f"Idempotency-Key is at most {key_chars_max} characters")
    digest = body_hash(body)
    _serialize_twins(session, principal, key)
    stored = session.scalar(
        select(IdempotencyKey)
        .where(IdempotencyKey.principal == principal, IdempotencyKey.key == key)
        .with_for_update()
    )
    if stored is not None:
        if stored.request_hash != digest:
            raise Conflict("this Idempotency-Key was used with a different body")
        return stored.status, json.loads(stored.body)
    status, answer = work()
    session.add(
        IdempotencyKey(
            principal=principal,
            key=key,
            request_hash=digest,
            status=status,
            body=json.dumps(answer),
            created_at=at,
        )
    )
    session.flush()
    return status, answer
