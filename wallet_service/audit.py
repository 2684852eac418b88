"""Who did what, when: every change to a card or the registry leaves an event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from wallet_service.models import AuditEvent


def record(
    session: Session, actor: str, action: str, subject: str, at: datetime, **details: Any
) -> None:
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            subject=subject,
            details=json.dumps(details, sort_keys=True, default=str, ensure_ascii=False),
            created_at=at,
        )
    )
