"""The bus company's web platform: server-rendered pages over the same service functions
the API uses. Log in with an API token (admin or staff); staff see their own bus company
only. Chinese or English (``?lang=zh|en``, remembered in the session)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import date, datetime, timedelta
from functools import wraps
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import case, func, select

from wallet_service import ledger
from wallet_service.api.framework import context_for
from wallet_service.auth import Principal, authenticate
from wallet_service.errors import DomainError, Forbidden, InvalidInput, Unauthorized
from wallet_service.models import BusinessHall, CounterLoad, Operator, TopUpOrder
from wallet_service.services import clearing, pos_api, registry, reports
from wallet_service.services.cards import blacklist_since
from wallet_service.services.registry import Context
from wallet_service.web.charts import bar_chart
from wallet_service.web.i18n import LANGUAGES, translate

web = Blueprint("web", __name__, template_folder="../templates")
records_page_size = 50


def _language() -> str:
    chosen = request.args.get("lang")
    if chosen in LANGUAGES:
        session["lang"] = chosen
    if session.get("lang") in LANGUAGES:
        return session["lang"]
    return request.accept_languages.best_match(LANGUAGES) or "zh"


@web.app_context_processor
def _helpers() -> dict[str, Any]:
    language = _language()
    return {
        "_": lambda text: translate(text, language),
        "lang": language,
        "yuan": lambda fen: f"{(fen or 0) / 100:,.2f}",
        "csrf_token": _csrf_token,
    }


def _csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(16)
    return session["csrf"]


def _csrf_ok() -> bool:
    """The form's token equals the session's — and the session has one (a POST before any
    form was rendered has none, and must not pass as None == None)."""
    expected, sent = session.get("csrf"), request.form.get("csrf")
    return bool(expected) and bool(sent) and secrets.compare_digest(expected, sent)


def _context(db_session) -> Context:  # type: ignore[no-untyped-def]
    token = session.get("token")
    principal = authenticate(db_session, f"Bearer {token}" if token else None)
    principal.require("admin", "staff")
    return context_for(current_app, db_session, principal)


def page(view: Callable[..., Any]) -> Callable[..., Any]:
    """Run the view in one transaction with the logged-in principal; no login → /login."""

    @wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        if request.method == "POST" and not _csrf_ok():
            abort(400)
        database = current_app.extensions["database"]
        try:
            return database.run(lambda db_session: view(_context(db_session), **kwargs))
        except Unauthorized:
            return redirect(url_for("web.login", next=request.full_path))
        except Forbidden:
            abort(403)

    return wrapper


def _operators(ctx: Context) -> list[Operator]:
    query = select(Operator).order_by(Operator.code)
    if ctx.principal.role == "staff":
        query = query.where(Operator.id == ctx.principal.operator_id)
    return list(ctx.session.scalars(query))


def _chosen_operator(ctx: Context) -> Operator | None:
    operators = _operators(ctx)
    wanted = request.args.get("operator")
    return next((o for o in operators if o.code == wanted), operators[0] if operators else None)


def _render(ctx: Context, template: str, **values: Any) -> str:
    return render_template(
        template,
        principal=ctx.principal,
        operators=_operators(ctx),
        operator=values.pop("operator", None),
        **values,
    )


@web.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    if request.method == "POST":
        token = request.form.get("token", "").strip()
        database = current_app.extensions["database"]
        try:
            principal: Principal = database.run(
                lambda db_session: authenticate(db_session, f"Bearer {token}")
            )
            principal.require("admin", "staff")
        except DomainError:
            error = "Unknown or revoked token"
        else:
            session.clear()
            session["token"] = token
            target = request.args.get("next") or url_for("web.dashboard")
            local = target.startswith("/") and not target.startswith("//")  # no open redirect
            return redirect(target if local else url_for("web.dashboard"))
    return render_template("login.html", error=error, principal=None)


@web.route("/logout")
def logout() -> Any:
    session.clear()
    return redirect(url_for("web.login"))


@web.route("/")
@page
def dashboard(ctx: Context) -> str:
    operator = _chosen_operator(ctx)
    today = ctx.now.date()
    by_hour, by_route = [], []
    if operator is not None:
        today_only = reports.RecordFilter(start=today, end=today)
        by_hour = reports.statistics(ctx, operator.code, "hour", today_only)
        by_route = reports.statistics(ctx, operator.code, "route", today_only)
    rides = sum(row["rides"] for row in by_hour)
    revenue = sum(row["revenue_fen"] for row in by_hour)
    return _render(
        ctx,
        "dashboard.html",
        operator=operator,
        today=today,
        rides=rides,
        revenue=revenue,
        hour_chart=bar_chart(
            [(r["key"], r["rides"]) for r in by_hour], translate("Rides by hour", _language())
        ),
        route_chart=bar_chart(
            [(r["key"], r["revenue_fen"] / 100) for r in by_route],
            translate("Revenue by route", _language()),
            "#c0504d",
        ),
    )


@web.route("/clearing", methods=["GET", "POST"])
@page
def clearing_page(ctx: Context) -> Any:
    day_text = request.values.get("day") or (ctx.now.date() - timedelta(days=1)).isoformat()
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        abort(400)
    message = None
    if request.method == "POST":
        if ctx.principal.role != "admin":
            message = "Only administrators run clearing"
        else:
            clearing.run(ctx, day)
            return redirect(url_for("web.clearing_page", day=day.isoformat()))
    operator = _chosen_operator(ctx)
    report = clearing.day_report(_as_admin(ctx), day)
    mine = [t for t in report["totals"] if operator and t["operator"] == operator.code]
    statements = clearing.statements(ctx, operator.code, day) if operator else []
    by_route: dict[str, int] = {}
    for total in mine:
        by_route[total["route"]] = by_route.get(total["route"], 0) + total["amount_fen"]
    return _render(
        ctx,
        "clearing.html",
        operator=operator,
        day=day,
        report=report,
        totals=mine,
        statements=statements,
        message=message,
        exceptions=[
            e
            for e in report["exceptions"]
            if ctx.principal.role == "admin" or _own_card_exception(ctx, e)
        ],
        route_chart=bar_chart(
            sorted((k, v / 100) for k, v in by_route.items()),
            translate("Revenue by route", _language()),
            "#c0504d",
        ),
    )


def _as_admin(ctx: Context) -> Context:
    """The day report is cross-operator; pages filter it to the staff's own operator."""
    return Context(
        ctx.session, Principal(ctx.principal.token_id, "admin"), ctx.now, ctx.keys, ctx.output_dir
    )


def _own_card_exception(ctx: Context, exception: dict[str, Any]) -> bool:
    return exception.get("terminal_id") in {
        d.terminal_id
        for d in ctx.session.scalars(
            select(pos_api.PosDevice).where(
                pos_api.PosDevice.operator_id == ctx.principal.operator_id
            )
        )
    }


@web.route("/records")
@page
def records_page(ctx: Context) -> str:
    operator = _chosen_operator(ctx)
    record_filter = reports.RecordFilter(
        card=request.args.get("card") or None,
        start=_date_arg("from"),
        end=_date_arg("to"),
        route=request.args.get("route") or None,
        vehicle=request.args.get("vehicle") or None,
        driver=request.args.get("driver") or None,
    )
    after = request.args.get("after_id", "0")
    rows, next_after = ([], None)
    if operator is not None:
        rows, next_after = reports.query_records(
            ctx,
            operator.code,
            record_filter,
            int(after) if after.isdigit() else 0,
            records_page_size,
        )
    query = {k: v for k, v in request.args.items() if k not in ("after_id", "lang") and v}
    return _render(
        ctx, "records.html", operator=operator, rows=rows, next_after=next_after, query=query
    )


def _date_arg(name: str) -> date | None:
    try:
        return date.fromisoformat(request.args.get(name, ""))
    except ValueError:
        return None


@web.route("/records.csv")
@page
def records_csv(ctx: Context) -> Response:
    operator = _chosen_operator(ctx)
    if operator is None:
        abort(404)
    record_filter = reports.RecordFilter(
        card=request.args.get("card") or None,
        start=_date_arg("from"),
        end=_date_arg("to"),
        route=request.args.get("route") or None,
        vehicle=request.args.get("vehicle") or None,
        driver=request.args.get("driver") or None,
    )
    from flask import stream_with_context

    database = current_app.extensions["database"]
    lines = reports.csv_lines(database.run, operator.id, record_filter)

    return Response(
        stream_with_context(lines),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{operator.code}-records.csv"'},
    )


@web.route("/registry")
@page
def registry_page(ctx: Context) -> str:
    operator = _chosen_operator(ctx)
    from wallet_service.models import Driver, DriverCard, Fleet, PosDevice, Route, Vehicle

    lists: dict[str, list[Any]] = {}
    if operator is not None:
        for name, model in (
            ("Fleets", Fleet),
            ("Routes", Route),
            ("Vehicles", Vehicle),
            ("Drivers", Driver),
            ("POS devices", PosDevice),
        ):
            lists[name] = registry.list_of(ctx, model, operator.code)
        lists["Driver cards"] = list(
            ctx.session.scalars(
                select(DriverCard)
                .join(Driver, Driver.id == DriverCard.driver_id)
                .where(Driver.operator_id == operator.id)
                .order_by(DriverCard.id)
            )
        )
    return _render(ctx, "registry.html", operator=operator, lists=lists)


@web.route("/devices")
@page
def devices_page(ctx: Context) -> str:
    operator = _chosen_operator(ctx)
    devices = []
    if operator is not None:
        devices = pos_api.device_status(ctx, operator.code, blacklist_since(ctx, 0)[0])
    return _render(ctx, "devices.html", operator=operator, devices=devices)


@web.route("/reconciliation", methods=["GET", "POST"])
@page
def reconciliation_page(ctx: Context) -> str:
    """Counter top-ups against the ledger, OTA orders by state, and the daily three-way
    match of an uploaded bank statement against orders and confirmed loads."""
    ctx.principal.require("admin")
    match, message = None, None
    day_text = request.values.get("day") or (ctx.now.date() - timedelta(days=1)).isoformat()
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        abort(400)
    if request.method == "POST":
        from wallet_service.services import reconciliation

        upload = request.files.get("statement")
        try:
            text = upload.read().decode("utf-8") if upload else ""
            match = reconciliation.reconcile(ctx, day, text)
        except (InvalidInput, UnicodeDecodeError) as error:
            message = str(error)
    rows = ctx.session.execute(
        select(
            BusinessHall.code,
            BusinessHall.name,
            func.sum(case((CounterLoad.state == "loaded", CounterLoad.amount_fen), else_=0)),
            func.sum(case((CounterLoad.state == "pending", 1), else_=0)),
            func.sum(case((CounterLoad.state == "failed", 1), else_=0)),
        )
        .join(CounterLoad, CounterLoad.hall_id == BusinessHall.id, isouter=True)
        .group_by(BusinessHall.code, BusinessHall.name)
        .order_by(BusinessHall.code)
    ).all()
    halls = []
    for code, name, loaded, pending, failed in rows:
        account = ledger.open_account(ctx.session, ledger.HALL_CASH, code)
        halls.append(
            {
                "code": code,
                "name": name,
                "loaded_fen": int(loaded or 0),
                "pending": int(pending or 0),
                "failed": int(failed or 0),
                "cash_fen": account.debits_fen - account.credits_fen,
            }
        )
    try:
        ledger.check_balanced(ctx.session)
        balanced = True
    except AssertionError:
        balanced = False
    topups = [
        {"state": state, "orders": count, "amount_fen": int(amount or 0)}
        for state, count, amount in ctx.session.execute(
            select(TopUpOrder.state, func.count(), func.sum(TopUpOrder.amount_fen))
            .group_by(TopUpOrder.state)
            .order_by(TopUpOrder.state)
        )
    ]
    from wallet_service.services.topups import TOPUP_PENDING

    pending = ledger.open_account(ctx.session, TOPUP_PENDING, "platform")
    return _render(
        ctx,
        "reconciliation.html",
        halls=halls,
        balanced=balanced,
        generated=datetime.now().replace(microsecond=0),
        topups=topups,
        topup_pending_fen=ledger.balance(pending),
        day=day,
        match=match,
        message=message,
    )
