"""Bearer tokens with a role and a tenant.

Roles: ``admin`` (the platform), ``counter`` (a business hall or agent: its hall),
``staff`` (a bus company: its operator), ``pos`` (one POS device). Only a SHA-256 of the
token is stored; the token itself is shown once, when created.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from wallet_service.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from wallet_service.models import ApiToken, BusinessHall, Operator, PosDevice

ROLES = ("admin", "counter", "staff", "pos")
token_bytes = 32


@dataclass(frozen=True)
class Principal:
    token_id: int
    role: str
    operator_id: int | None = None
    hall_id: int | None = None
    device_id: int | None = None

    @property
    def name(self) -> str:
        return f"{self.role}#{self.token_id}"

    def require(self, *roles: str) -> None:
        if self.role not in roles:
            raise Forbidden(f"this needs the role {' or '.join(roles)}")

    def require_operator(self, operator_id: int) -> None:
        """Admins see every bus company; staff only their own."""
        if self.role == "admin":
            return
        if self.role != "staff" or self.operator_id != operator_id:
            raise NotFound("no such resource")  # another tenant's data does not exist


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session,
    role: str,
    *,
    label: str = "",
    operator_code: str | None = None,
    hall_code: str | None = None,
    terminal_id: str | None = None,
    at: datetime,
) -> str:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    token = ApiToken(role=role, label=label[:60], created_at=at, revoked=False, token_hash="")
    if role == "staff":
        token.operator_id = _id_of(session, Operator, Operator.code, operator_code, "operator")
    elif role == "counter":
        token.hall_id = _id_of(session, BusinessHall, BusinessHall.code, hall_code, "hall")
    elif role == "pos":
        token.device_id = _id_of(
            session, PosDevice, PosDevice.terminal_id, terminal_id, "POS device"
        )
    secret = secrets.token_urlsafe(token_bytes)
    token.token_hash = _digest(secret)
    session.add(token)
    session.flush()
    return secret


def _id_of(session: Session, model, column, value: str | None, what: str) -> int:  # type: ignore[no-untyped-def]
    if not value:
        raise InvalidInput(f"a token of this role belongs to a {what}: name it")
    found = session.scalar(select(model.id).where(column == value))
    if found is None:
        raise NotFound(f"no {what} {value!r}")
    return found


def authenticate(session: Session, header: str | None) -> Principal:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("send Authorization: Bearer <token>")
    token = session.scalar(
        select(ApiToken).where(ApiToken.token_hash == _digest(header[len("Bearer ") :].strip()))
    )
    if token is None or token.revoked:
        raise Unauthorized("unknown or revoked token")
    return Principal(token.id, token.role, token.operator_id, token.hall_id, token.device_id)
