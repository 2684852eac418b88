"""Expected failures as values with a code, and the one JSON shape they take at the edge:

{"error": {"code": "insufficient_funds", "message": "...", "details": {...}}}
"""

from __future__ import annotations

from typing import Any


class ConfigurationError(ValueError):
    """The operator's setup is wrong (a key file, DATABASE_URL): said in one line, at start."""


class DomainError(Exception):
    """An expected refusal. ``status`` is the HTTP status the edge answers with."""

    status = 422
    code = "unprocessable"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class NotFound(DomainError):
    status, code = 404, "not_found"


class Conflict(DomainError):
    status, code = 409, "conflict"


class InvalidInput(DomainError):
    status, code = 422, "invalid_input"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class Unauthorized(DomainError):
    status, code = 401, "unauthorized"


class LimitExceeded(DomainError):
    status, code = 422, "limit_exceeded"


class CardRefused(DomainError):
    """The card's cryptography does not check out (bad MAC1, bad TAC)."""

    status, code = 422, "card_refused"
