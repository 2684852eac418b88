"""Bank callbacks (Standard Webhooks): verified on the raw body, at most 5 minutes old,
deduplicated by webhook-id, and stored before they are acknowledged — so a callback the
bank retries, or one that arrives twice, is processed once; a forged one changes nothing.

The stored events drive the top-up orders (OTA issue §5): ``payment.succeeded`` pays an
order, ``refund.succeeded`` confirms a refund.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, text
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from wallet_service.errors import InvalidInput, Unauthorized
from wallet_service.models import BankWebhookEvent
from wallet_service.services.registry import Context

KNOWN_EVENTS = ("payment.succeeded", "refund.succeeded")
payload_bytes_max = 64_000


def receive(
    ctx: Context, secret: str | None, raw_body: bytes, headers: dict[str, str]
) -> dict[str, Any]:
    if not secret:
        raise Unauthorized("the platform has no bank webhook secret configured")
    if len(raw_body) > payload_bytes_max:
        raise InvalidInput(f"a webhook body is at most {payload_bytes_max} bytes")
    try:
        # Checks the HMAC over id.timestamp.body and the 5-minute timestamp tolerance.
        payload = Webhook(secret).verify(raw_body, headers)
    except (WebhookVerificationError, ValueError, TypeError, UnicodeDecodeError) as error:
        raise Unauthorized(f"webhook signature rejected: {error}") from None
    webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
    if not isinstance(payload, dict) or payload.get("type") not in KNOWN_EVENTS:
        raise InvalidInput("unknown webhook event type")
    if len(webhook_id) > 100:
        raise InvalidInput("webhook-id too long")
    if ctx.session.scalar(select(BankWebhookEvent.id).where(BankWebhookEvent.id == webhook_id)):
        return {"webhook_id": webhook_id, "duplicate": True}
    ctx.session.add(
        BankWebhookEvent(
            id=webhook_id,
            event_type=payload["type"],
            payload=json.dumps(payload),
            received_at=ctx.now,
            processed_at=None,
        )
    )
    ctx.session.flush()
    work_waiting(ctx.session)
    return {"webhook_id": webhook_id, "duplicate": False}


WORK_CHANNEL = "wallet_work"


def work_waiting(session: Any) -> None:
    """Wake the OTA workers (PostgreSQL LISTEN/NOTIFY, delivered at commit — never for a
    rolled-back event). On SQLite the workers poll."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {WORK_CHANNEL}"))
