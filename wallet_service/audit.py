"""Who did what, when: every change to a card or the registry leaves an event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from wallet_service.db import insert_at_commit
from wallet_service.models import AuditEvent

# Written as the transaction commits, as a plain INSERT with its other events in one
# executemany (``insert_at_commit``): an event is never read back in the transaction that
# writes it, and an ORM object would cost a unit-of-work flush (about four times the
# INSERT's CPU; the worker writes one or two per top-up). Built once.
_INSERT_EVENT = insert(AuditEvent.__table__).inline()  # (no id returned: see insert_at_commit)


def record(
    session: Session, actor: str, action: str, subject: str, at: datetime, **details: Any
) -> None:
    event = {
        "actor": actor,
        "action": action,
        "subject": subject,
        "details": json.dumps(details, sort_keys=True, default=str, ensure_ascii=False),
        "created_at": at,
    }
    insert_at_commit(session, _INSERT_EVENT, event)
