"""Operators' commands: ``python app.py serve``, ``db upgrade``, ``admin create-token``."""

from __future__ import annotations

import contextlib
import sys

import click

from sim_applet.toolkit import DEFAULT_PLATFORM_NUMBER
from wallet_service import default_config


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="requests served at once by each worker",
)
@click.option("--no-migrate", is_flag=True, help="do not apply migrations first")
def serve(host: str, port: int, workers: int, threads: int, no_migrate: bool) -> None:
    """Run the wallet service (granian; migrations applied first) until SIGTERM, SIGINT
    or SIGHUP."""
    default_config()  # a setup mistake stops here, in one line, not in each worker's boot
    if not no_migrate:
        _upgrade()
    from wallet_service.http_server import CannotListen
    from wallet_service.http_server import serve as serve_wsgi

    def listening(url: str) -> None:
        click.echo(f"wallet service on {url} (OpenAPI: /openapi.json)")

    try:
        serve_wsgi(
            _load_app,
            {},
            host=host,
            port=port,
            on_listening=listening,
            workers=workers,
            threads=threads,
            access_log=True,
        )
    except CannotListen as error:
        raise _CannotServe(str(error)) from None


class _CannotServe(click.ClickException):
    exit_code = 2  # (as a bad argument: a port taken, a host not this machine's)


def _load_app(_settings: dict) -> object:
    """(In each of granian's worker processes.) The service, configured from the
    environment as ``serve`` was."""
    from wallet_service import create_app

    return create_app()


def _upgrade() -> None:
    from wallet_service.migrate import upgrade

    url = default_config()["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    upgrade(url)


@click.group()
def db() -> None:
    """The database schema (Alembic)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to DATABASE_URL (default: SQLite under instance/)."""
    _upgrade()
    click.echo("database is at the newest schema")


@click.group()
def admin() -> None:
    """Platform administration."""


@admin.command("create-token")
@click.option("--role", type=click.Choice(["admin", "counter", "staff", "pos"]), required=True)
@click.option("--operator", help="staff: the bus company's code")
@click.option("--hall", help="counter: the business hall's or agent's code")
@click.option("--terminal-id", help="pos: the device's terminal id")
@click.option("--label", default="", help="a note to recognize the token by")
def create_token(
    role: str, operator: str | None, hall: str | None, terminal_id: str | None, label: str
) -> None:
    """Print a new API token (shown once; only its hash is stored)."""
    from wallet_service import create_app
    from wallet_service.auth import create_token as make
    from wallet_service.errors import DomainError

    _upgrade()
    app = create_app()
    database = app.extensions["database"]
    try:
        token = database.run(
            lambda session: make(
                session,
                role,
                label=label,
                operator_code=operator,
                hall_code=hall,
                terminal_id=terminal_id.upper() if terminal_id else None,
                at=app.config["CLOCK"](),
            )
        )
    except DomainError as error:
        click.echo(f"Error: {error.message}", err=True)
        sys.exit(2)
    finally:
        database.dispose()
    click.echo(token)


@click.group()
def clearing() -> None:
    """Clearing and settlement of a business day."""


@clearing.command("run")
@click.option(
    "--date", "day", type=click.DateTime(["%Y-%m-%d"]), help="the business day (default: yesterday)"
)
def clearing_run(day) -> None:  # type: ignore[no-untyped-def]
    """Clear a business day: verify TACs, check chains, total, settle. Safe to re-run."""
    from datetime import date, timedelta

    _clear(day.date() if day else date.today() - timedelta(days=1))


def _clear(business_date) -> None:  # type: ignore[no-untyped-def]
    import json

    from wallet_service.services import clearing as clearing_service

    report = _as_admin(lambda ctx: clearing_service.run(ctx, business_date))
    click.echo(json.dumps(report.__dict__, default=str, indent=1))


def _as_admin(work):  # type: ignore[no-untyped-def]
    """``work(ctx)`` in one transaction of the configured database, as the platform."""
    from wallet_service import create_app
    from wallet_service.services.registry import Context

    _upgrade()
    app = create_app()
    database = app.extensions["database"]
    try:
        return database.run(lambda session: work(Context.for_platform(session, app.config)))
    finally:
        database.dispose()


@clearing.command("schedule")
@click.option(
    "--at",
    "at_time",
    default="02:00",
    show_default=True,
    help="local time of day to clear yesterday (HH:MM)",
)
@click.option("--once", is_flag=True, help="wait for the next run, do it, and exit")
def clearing_schedule(at_time: str, once: bool) -> None:
    """The scheduled job: every day at --at, clear the previous business day."""
    import time as time_module
    from datetime import datetime

    try:
        hour, minute = (int(part) for part in at_time.split(":"))
        datetime.now().replace(hour=hour, minute=minute)
    except ValueError:
        raise click.BadParameter("use HH:MM", param_hint="--at") from None
    _upgrade()  # (the database's address or credentials wrong: said now, not at the hour)
    if not run_schedule(hour, minute, once, datetime.now, time_module.sleep):
        sys.exit(1)


clearing_attempts_max = 12  # a day's run, tried again ...
clearing_retry_wait_s = 300  # ... this long after a failure: an hour in all


def run_schedule(hour: int, minute: int, once: bool, clock, sleep) -> bool:  # type: ignore[no-untyped-def]
    """Every day at hour:minute (``clock`` and ``sleep``: the time), clear the day before.
    A day the database was away for (a restart at night: ``_clear_trying_again``) waits
    and is cleared at the next run before the day after it — each record under its own
    day, in order: cleared later, the next day's run would take its records as its own.
    Returns (``once``: after one run) whether every day so far was cleared. (The days a
    job left uncleared are not known to the next job started: ``clearing run --date``.)"""
    from datetime import timedelta

    waiting: list = []  # days given up, oldest first
    while True:
        now = clock()
        next_run = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if next_run <= now:
            next_run += timedelta(days=1)
        click.echo(f"next clearing at {next_run:%Y-%m-%d %H:%M}")
        sleep((next_run - now).total_seconds())
        days = [*waiting, (next_run - timedelta(days=1)).date()]
        cleared = 0
        while cleared < len(days) and _clear_trying_again(days[cleared], sleep):
            cleared += 1
        waiting = days[cleared:]
        if waiting:
            click.echo(
                f"not cleared: {', '.join(map(str, waiting))}: tried again at the next run "
                "(or: app.py clearing run --date DAY, oldest first)",
                err=True,
            )
        if once:
            return not waiting


def _clear_trying_again(day, sleep) -> bool:  # type: ignore[no-untyped-def]
    """Clear ``day``; the database away or too busy, ask again a while later — one failure
    used to end the job, and no day after it was cleared. Whatever else fails (a bug, the
    configuration) ends the job, loudly."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(1, clearing_attempts_max + 1):
        try:
            _clear(day)
            return True
        except DBAPIError as error:
            if not database_away(error):
                raise
            click.echo(
                f"clearing {day} failed (attempt {attempt} of {clearing_attempts_max}): "
                f"{str(error.orig).strip() or type(error.orig).__name__}",
                err=True,
            )
        if attempt < clearing_attempts_max:
            sleep(clearing_retry_wait_s)
    return False


# SQLSTATEs of a wrong configuration: the credentials (class 28), no such database.
_CONFIGURATION_SQLSTATES = ("28", "3D000")


def database_away(error) -> bool:  # type: ignore[no-untyped-def]
    """The database could not be reached or was too busy (worth asking again later), not
    a wrong configuration nor a statement it will never run."""
    from sqlalchemy.exc import InterfaceError

    from wallet_service.db import the_database_failed

    state = getattr(error.orig, "sqlstate", None) or ""
    if state.startswith(_CONFIGURATION_SQLSTATES):
        return False
    return the_database_failed(error) or isinstance(error, InterfaceError)


@click.command()
@click.option("--smsc", "smsc_url", default="http://127.0.0.1:8070", show_default=True)
@click.option("--bank", "bank_url", default="http://127.0.0.1:8090", show_default=True)
@click.option("--short-code", default=DEFAULT_PLATFORM_NUMBER, show_default=True)
@click.option("--once", is_flag=True, help="one pass, then exit")
def worker(smsc_url: str, bank_url: str, short_code: str, once: bool) -> None:
    """Move top-up orders: bank callbacks, PoRs from the SMS centre, due OTA steps."""
    import signal
    import threading

    from wallet_service import create_app
    from wallet_service.sms_gateway import GatewayError, HttpGateway
    from wallet_service.worker import HttpBankClient, run_forever, run_once

    try:
        gateway = HttpGateway(smsc_url, short_code)
    except ValueError as error:  # not an http(s) URL, not an MSISDN
        raise click.UsageError(str(error)) from None
    _upgrade()
    app = create_app()
    bank = HttpBankClient(bank_url, app.config["BANK_WEBHOOK_SECRET"])
    if not app.config["BANK_WEBHOOK_SECRET"]:
        click.echo("worker: no WALLET_BANK_WEBHOOK_SECRET: refunds wait until it is set", err=True)
    if once:
        import requests

        try:
            click.echo(run_once(app, gateway, bank))
        except (requests.RequestException, GatewayError) as error:  # SMS centre or bank down
            raise click.ClickException(f"pass not done: {error}") from None
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"worker: SMS centre {smsc_url}, bank {bank_url}")
    with contextlib.suppress(KeyboardInterrupt):
        run_forever(app, gateway, bank, stop)


@click.group()
def topups() -> None:
    """Over-the-air top-ups: the daily three-way match with the bank."""


@topups.command("reconcile")
@click.option(
    "--date", "day", type=click.DateTime(["%Y-%m-%d"]), help="the business day (default: yesterday)"
)
@click.option(
    "--bank",
    "bank_url",
    default="http://127.0.0.1:8090",
    show_default=True,
    help="the bank whose daily statement to fetch",
)
@click.option(
    "--merchant", help="the platform's merchant id at the bank (default: WALLET_BANK_MERCHANT)"
)
@click.option(
    "--statement", type=click.File("r", encoding="utf-8"),
    help="the statement CSV from a file ('-': standard input) instead of the bank",
)  # fmt: skip
def topups_reconcile(day, bank_url: str, merchant: str | None, statement) -> None:  # type: ignore[no-untyped-def]
    """Match the bank's statement of a day, the orders and the confirmed loads; print the
    report (JSON). Exit 0: all matched; 1: findings (or the bank unreachable); 2: the
    statement is not one the bank writes."""
    import json
    from datetime import date, timedelta

    import requests

    from wallet_service.errors import InvalidInput
    from wallet_service.services import reconciliation

    if statement is not None and day is None:
        raise click.UsageError("--statement needs --date: the day the statement is of")
    business_day = day.date() if day else date.today() - timedelta(days=1)
    if statement is not None:
        csv = statement.read()
    else:
        from wallet_service.worker import HttpBankClient, NoBankSecret

        config = default_config()
        merchant = merchant or config["BANK_MERCHANT"]
        try:
            csv = HttpBankClient(bank_url, config["BANK_WEBHOOK_SECRET"]).statement(
                merchant, business_day
            )
        except NoBankSecret as missing:
            raise click.UsageError(f"{missing} (or give --statement)") from None
        except requests.RequestException as error:
            click.echo(f"Error: the bank's statement could not be fetched: {error}", err=True)
            sys.exit(1)
    try:
        report = _as_admin(lambda ctx: reconciliation.reconcile(ctx, business_day, csv))
    except InvalidInput as error:
        click.echo(f"Error: {error.message}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report, indent=1, ensure_ascii=False))
    sys.exit(0 if report["matched"] else 1)
