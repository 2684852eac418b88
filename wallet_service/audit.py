"""Who did what, when: every change to a card or the registry leaves an event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from wallet_service.db import insert_at_commit
from wallet_service.models import AuditEvent

# Written as the transaction commits, all of its events in one plain INSERT: an event is
# never read back in the transaction that writes it; an ORM object would cost a
# unit-of-work flush (about four times the INSERT's CPU), and an INSERT each, one
# statement a step (the worker writes one or two per top-up, a batch of them at once).
# A savepoint rolled back takes the events recorded in it along.


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
    insert_at_commit(session, AuditEvent.__table__, event)
