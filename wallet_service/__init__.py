"""The wallet service: the mobile bus card business management platform.

``create_app(config)`` builds the Flask app; nothing happens at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask, jsonify

INSTANCE_DIR = Path(__file__).resolve().parent.parent / "instance"


def default_config() -> dict[str, Any]:
    instance = Path(os.environ.get("WALLET_INSTANCE_DIR", INSTANCE_DIR))
    return {
        "DATABASE_URL": _database_url(
            os.environ.get("DATABASE_URL", f"sqlite:///{instance / 'wallet.sqlite'}")
        ),
        "PERSONALIZATION_DIR": os.environ.get(
            "WALLET_PERSONALIZATION_DIR", str(instance / "personalization")
        ),
        "KEY_FILE": os.environ.get("WALLET_KEY_FILE"),
        "BANK_WEBHOOK_SECRET": _bank_webhook_secret(os.environ.get("WALLET_BANK_WEBHOOK_SECRET")),
        # The platform's merchant id at the bank: payment links in order SMS name it.
        "BANK_MERCHANT": os.environ.get("WALLET_BANK_MERCHANT", "BUSCARD"),
        # Sum of debits = sum of credits, verified inside every transaction before commit.
        "LEDGER_CHECK_EVERY_COMMIT": os.environ.get("WALLET_LEDGER_CHECK") == "1",
        # PostgreSQL's limits on each connection (``wallet_service.db.SessionLimits``).
        "DB_STATEMENT_TIMEOUT_S": _seconds("WALLET_DB_STATEMENT_TIMEOUT_S", "statement_timeout_s"),
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_S": _seconds(
            "WALLET_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", "idle_in_transaction_timeout_s"
        ),
    }


def _seconds(variable: str, limit: str) -> float:
    """A ``SessionLimits`` field from the environment, or its default; a ConfigurationError
    now for a value that is not one."""
    from wallet_service.db import SessionLimits
    from wallet_service.errors import ConfigurationError

    default = getattr(SessionLimits(), limit)
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return getattr(SessionLimits(**{limit: float(text)}), limit)
    except ValueError as error:
        raise ConfigurationError(f"{variable}: {error}") from None


def _database_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from wallet_service.errors import ConfigurationError

    try:
        make_url(url)
    except ArgumentError:
        raise ConfigurationError(  # not echoed: it may hold a password
            "DATABASE_URL is not a database URL (sqlite:///path, postgresql+psycopg://user@host/db)"
        ) from None
    return url


def _bank_webhook_secret(secret: str | None) -> str | None:
    """The bank's Standard Webhooks secret as the bank's webhook library will read it, or
    a ConfigurationError now (not a 401 for every callback later). Unset or empty: no
    secret, and every callback is refused."""
    from reader_sim.bank import webhook_key
    from wallet_service.errors import ConfigurationError

    if secret:
        try:
            webhook_key(secret)
        except ValueError as error:
            raise ConfigurationError(f"WALLET_BANK_WEBHOOK_SECRET: {error}") from None
    return secret


def _secret_key(config: dict[str, Any]) -> str:
    """The session cookie's signing key: WALLET_SECRET_KEY, else one made once per instance
    and kept beside the personalization output (so the server's workers agree)."""
    import secrets

    if os.environ.get("WALLET_SECRET_KEY"):
        return os.environ["WALLET_SECRET_KEY"]
    path = Path(config["PERSONALIZATION_DIR"]).parent / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    from wallet_service.api.framework import (
        SignedWebhooksFirst,
        install_error_handlers,
        openapi_document,
        utc_now,
    )
    from wallet_service.api.routes import BLUEPRINTS
    from wallet_service.db import Database
    from wallet_service.keystore import key_store_from

    app = Flask(__name__)
    app.config.update(default_config())
    app.config.update(config or {})
    app.config.setdefault("CLOCK", utc_now)
    _bank_webhook_secret(app.config["BANK_WEBHOOK_SECRET"])
    if "KEY_STORE" not in app.config:
        app.config["KEY_STORE"] = key_store_from(app.config["KEY_FILE"])
    Path(app.config["PERSONALIZATION_DIR"]).mkdir(parents=True, exist_ok=True)
    database_url = app.config["DATABASE_URL"]
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    database = Database()
    database.init_app(app)
    if app.config["LEDGER_CHECK_EVERY_COMMIT"] or app.config.get("TESTING"):
        from wallet_service.ledger import check_balanced

        database.check_before_every_commit(check_balanced)
    install_error_handlers(app)
    app.wsgi_app = SignedWebhooksFirst(app, app.wsgi_app)  # type: ignore[method-assign]
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    from wallet_service.web import web

    app.register_blueprint(web)
    app.secret_key = app.config.get("SECRET_KEY") or _secret_key(app.config)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
    document = openapi_document("Mobile bus card platform", "1")

    @app.get("/openapi.json")
    def openapi():  # type: ignore[no-untyped-def]
        return jsonify(document)

    @app.get("/health")
    def health():  # type: ignore[no-untyped-def]
        return jsonify({"status": "ok"})

    return app
