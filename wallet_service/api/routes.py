"""The blueprints: registry, cards, counter top-ups, POS devices, ledger. Each view parses
(done by ``endpoint``), calls one service function, and shapes the answer."""

from __future__ import annotations

from flask import Blueprint

from wallet_service import auth, idempotency, ledger
from wallet_service.api import schemas as s
from wallet_service.api.framework import endpoint
from wallet_service.models import Account, Card, Driver, Fleet, Route, Vehicle
from wallet_service.services import cards, counter, pos_api, registry
from wallet_service.services.registry import Context

registry_bp = Blueprint("registry", __name__, url_prefix="/api/v1")
cards_bp = Blueprint("cards", __name__, url_prefix="/api/v1/cards")
counter_bp = Blueprint("counter", __name__, url_prefix="/api/v1/counter")
pos_bp = Blueprint("pos", __name__, url_prefix="/api/v1/pos")
ledger_bp = Blueprint("ledger", __name__, url_prefix="/api/v1/ledger")
BLUEPRINTS = (registry_bp, cards_bp, counter_bp, pos_bp, ledger_bp)

ADMIN = ("admin",)
REGISTRY = ("admin", "staff")
COUNTER = ("admin", "counter")

# --- registry ------------------------------------------------------------------------------


@endpoint(
    registry_bp,
    "/operators",
    "POST",
    summary="Create a bus company",
    roles=ADMIN,
    body=s.OperatorIn,
    response=s.OperatorOut,
    status=201,
)
def create_operator(ctx: Context, body: s.OperatorIn) -> s.OperatorOut:
    operator = registry.create_operator(ctx, body.code, body.name, body.fee_rate_bp)
    return s.OperatorOut(code=operator.code, name=operator.name, fee_rate_bp=operator.fee_rate_bp)


@endpoint(
    registry_bp,
    "/halls",
    "POST",
    summary="Create a business hall or agent",
    roles=ADMIN,
    body=s.HallIn,
    response=s.HallOut,
    status=201,
)
def create_hall(ctx: Context, body: s.HallIn) -> s.HallOut:
    hall = registry.create_hall(ctx, body.code, body.name, body.kind, body.daily_limit_fen)
    return s.HallOut(
        code=hall.code, name=hall.name, kind=hall.kind, daily_limit_fen=hall.daily_limit_fen
    )


def _item(row) -> s.RegistryItem:  # type: ignore[no-untyped-def]
    return s.RegistryItem(
        code=row.code,
        name=getattr(row, "name", None),
        fare_fen=getattr(row, "fare_fen", None),
        fleet_id=getattr(row, "fleet_id", None),
        route_id=getattr(row, "route_id", None),
        plate=getattr(row, "plate", None),
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/fleets",
    "POST",
    summary="Create a fleet",
    roles=REGISTRY,
    body=s.FleetIn,
    response=s.RegistryItem,
    status=201,
)
def create_fleet(ctx: Context, operator: str, body: s.FleetIn) -> s.RegistryItem:
    return _item(registry.create_fleet(ctx, operator, body.code, body.name))


@endpoint(
    registry_bp,
    "/operators/<operator>/routes",
    "POST",
    summary="Create a route with its flat fare",
    roles=REGISTRY,
    body=s.RouteIn,
    response=s.RegistryItem,
    status=201,
)
def create_route(ctx: Context, operator: str, body: s.RouteIn) -> s.RegistryItem:
    return _item(registry.create_route(ctx, operator, body.code, body.name, body.fare_fen))


@endpoint(
    registry_bp,
    "/operators/<operator>/vehicles",
    "POST",
    summary="Create a vehicle",
    roles=REGISTRY,
    body=s.VehicleIn,
    response=s.RegistryItem,
    status=201,
)
def create_vehicle(ctx: Context, operator: str, body: s.VehicleIn) -> s.RegistryItem:
    return _item(
        registry.create_vehicle(ctx, operator, body.code, body.plate, body.fleet, body.route)
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/drivers",
    "POST",
    summary="Create a driver",
    roles=REGISTRY,
    body=s.DriverIn,
    response=s.RegistryItem,
    status=201,
)
def create_driver(ctx: Context, operator: str, body: s.DriverIn) -> s.RegistryItem:
    return _item(registry.create_driver(ctx, operator, body.code, body.name, body.fleet))


_LISTS = {"fleets": Fleet, "routes": Route, "vehicles": Vehicle, "drivers": Driver}


def _lister(kind: str):  # type: ignore[no-untyped-def]
    def view(ctx: Context, operator: str) -> s.RegistryList:
        return s.RegistryList(
            items=[_item(r) for r in registry.list_of(ctx, _LISTS[kind], operator)]
        )

    view.__name__ = f"list_{kind}"
    return view


for _kind in _LISTS:
    endpoint(
        registry_bp,
        f"/operators/<operator>/{_kind}",
        "GET",
        summary=f"List {_kind}",
        roles=REGISTRY,
        response=s.RegistryList,
    )(_lister(_kind))


@endpoint(
    registry_bp,
    "/operators/<operator>/drivers/<driver>/cards",
    "POST",
    summary="Issue a driver card (image written to the personalization directory)",
    roles=REGISTRY,
    body=s.DriverCardIn,
    response=s.DriverCardOut,
    status=201,
)
def issue_driver_card(
    ctx: Context, operator: str, driver: str, body: s.DriverCardIn
) -> s.DriverCardOut:
    card = registry.issue_driver_card(
        ctx, operator, driver, bytes.fromhex(body.serial), body.expiry
    )
    return s.DriverCardOut(
        serial=card.serial, driver=driver, expiry=card.expiry, image_file=card.image_file
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/pos-devices",
    "POST",
    summary="Register a POS on a vehicle, provision its PSAM, create its token",
    roles=REGISTRY,
    body=s.PosDeviceIn,
    response=s.PosDeviceOut,
    status=201,
)
def register_pos(ctx: Context, operator: str, body: s.PosDeviceIn) -> s.PosDeviceOut:
    device, psam_file = registry.register_pos_device(
        ctx, operator, body.vehicle, bytes.fromhex(body.terminal_id)
    )
    token = auth.create_token(
        ctx.session,
        "pos",
        label=f"POS {device.terminal_id}",
        terminal_id=device.terminal_id,
        at=ctx.now,
    )
    return s.PosDeviceOut(
        terminal_id=device.terminal_id, vehicle=body.vehicle, token=token, psam_file=psam_file
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/pos-devices/<terminal_id>/retire",
    "POST",
    summary="Take a POS out of service for good: its tokens revoked, its records no longer awaited",
    roles=REGISTRY,
    body=s.RetirePosIn,
    response=s.RetiredPosOut,
)
def retire_pos(
    ctx: Context, operator: str, terminal_id: str, body: s.RetirePosIn
) -> s.RetiredPosOut:
    device, revoked = registry.retire_pos_device(ctx, operator, terminal_id, body.reason)
    return s.RetiredPosOut(
        terminal_id=device.terminal_id,
        retired_at=device.retired_at,
        tokens_revoked=revoked,
        records_pending=device.records_pending,
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/pos-devices",
    "GET",
    summary="POS device status: online from heartbeats, silent devices flagged, pending "
    "records, blacklist lag, PSAM sequence",
    roles=REGISTRY,
    query=s.DeviceStatusQuery,
    response=s.DeviceStatusList,
)
def device_status(ctx: Context, operator: str, query: s.DeviceStatusQuery) -> s.DeviceStatusList:
    version = cards.blacklist_since(ctx, 0)[0]
    devices = pos_api.device_status(ctx, operator, version, query.silent_hours)
    return s.DeviceStatusList(devices=devices)


# --- cards ---------------------------------------------------------------------------------


def _card_out(ctx: Context, card: Card) -> s.CardOut:
    return s.CardOut(**cards.view(ctx, card).__dict__)


@endpoint(
    cards_bp,
    "",
    "POST",
    summary="Issue a mobile bus card to a phone's SIM",
    roles=COUNTER,
    body=s.CardIssueIn,
    response=s.CardOut,
    status=201,
)
def issue_card(ctx: Context, body: s.CardIssueIn) -> s.CardOut:
    return _card_out(ctx, cards.issue(ctx, body.iccid, body.phone, body.algorithm))


@endpoint(cards_bp, "/<serial>", "GET", summary="A card", roles=COUNTER, response=s.CardOut)
def get_card(ctx: Context, serial: str) -> s.CardOut:
    return _card_out(ctx, cards.card_by_serial(ctx, serial))


@endpoint(
    cards_bp,
    "/<serial>/activate",
    "POST",
    summary="Activate an issued card",
    roles=COUNTER,
    response=s.CardOut,
)
def activate_card(ctx: Context, serial: str) -> s.CardOut:
    return _card_out(ctx, cards.activate(ctx, serial))


@endpoint(
    cards_bp,
    "/<serial>/holder",
    "PUT",
    summary="Real-name registration",
    roles=COUNTER,
    body=s.HolderIn,
    response=s.CardOut,
)
def register_holder(ctx: Context, serial: str, body: s.HolderIn) -> s.CardOut:
    card = cards.register_holder(ctx, serial, body.name, body.id_type, body.id_number)
    return _card_out(ctx, card)


@endpoint(
    cards_bp,
    "/<serial>/loss",
    "POST",
    summary="Report loss (id check): hot-list",
    roles=COUNTER,
    body=s.IdentityIn,
    response=s.CardOut,
)
def report_loss(ctx: Context, serial: str, body: s.IdentityIn) -> s.CardOut:
    return _card_out(ctx, cards.report_loss(ctx, serial, body.id_number))


@endpoint(
    cards_bp,
    "/<serial>/reissue",
    "POST",
    summary="Re-issue a lost card: the balance moves to a new card",
    roles=COUNTER,
    body=s.ReissueIn,
    response=s.CardOut,
    status=201,
    idempotent=True,
)
def reissue_card(ctx: Context, serial: str, body: s.ReissueIn):  # type: ignore[no-untyped-def]
    return _idempotent(
        ctx,
        body,
        201,
        lambda: _card_out(ctx, cards.reissue(ctx, serial, body.id_number, body.iccid, body.phone)),
    )


@endpoint(
    cards_bp,
    "/<serial>/close",
    "POST",
    summary="Close a card, refund it in cash",
    roles=("counter",),
    body=s.IdentityIn,
    response=s.CloseOut,
    idempotent=True,
)
def close_card(ctx: Context, serial: str, body: s.IdentityIn):  # type: ignore[no-untyped-def]
    def work() -> s.CloseOut:
        card, refund = cards.close(ctx, serial, body.id_number)
        return s.CloseOut(card=_card_out(ctx, card), refund_fen=refund)

    return _idempotent(ctx, body, 200, work)


def _idempotent(ctx: Context, body, status: int, work):  # type: ignore[no-untyped-def]
    from flask import request

    return idempotency.once(
        ctx.session,
        principal=ctx.principal.name,
        key=request.headers.get("Idempotency-Key"),
        body={"path": request.path, "body": body.model_dump(mode="json")},
        at=ctx.now,
        work=lambda: (status, work().model_dump(mode="json")),
    )


# --- counter top-up ------------------------------------------------------------------------


def _load_out(ctx: Context, load) -> s.LoadOut:  # type: ignore[no-untyped-def]
    card = ctx.session.get_one(Card, load.card_id)
    return s.LoadOut(
        load_id=load.id,
        state=load.state,
        amount_fen=load.amount_fen,
        card_serial=card.serial,
        tac=load.tac,
    )


@endpoint(
    counter_bp,
    "/loads",
    "POST",
    summary="Authorize a load: verify the card's MAC1, get MAC2",
    roles=("counter",),
    body=s.LoadAuthorizeIn,
    response=s.LoadAuthorizeOut,
    status=201,
    idempotent=True,
)
def authorize_load(ctx: Context, body: s.LoadAuthorizeIn):  # type: ignore[no-untyped-def]
    def work() -> s.LoadAuthorizeOut:
        result = counter.authorize(
            ctx,
            body.card_serial,
            body.amount_fen,
            bytes.fromhex(body.terminal_id),
            bytes.fromhex(body.init_response),
        )
        return s.LoadAuthorizeOut(**result.__dict__)

    return _idempotent(ctx, body, 201, work)


@endpoint(
    counter_bp,
    "/loads/<int:load_id>/confirm",
    "POST",
    summary="Confirm a load with the card's TAC: posted once",
    roles=("counter",),
    body=s.LoadConfirmIn,
    response=s.LoadOut,
    idempotent=True,
)
def confirm_load(ctx: Context, load_id: int, body: s.LoadConfirmIn):  # type: ignore[no-untyped-def]
    return _idempotent(
        ctx,
        body,
        200,
        lambda: _load_out(ctx, counter.confirm(ctx, load_id, bytes.fromhex(body.tac))),
    )


@endpoint(
    counter_bp,
    "/loads/<int:load_id>/resolve",
    "POST",
    summary="Resolve a load whose TAC never came, from GET TRANSACTION PROVE",
    roles=("counter",),
    body=s.LoadResolveIn,
    response=s.LoadOut,
    idempotent=True,
)
def resolve_load(ctx: Context, load_id: int, body: s.LoadResolveIn):  # type: ignore[no-untyped-def]
    proof = bytes.fromhex(body.proof_tac) if body.proof_tac else None
    return _idempotent(ctx, body, 200, lambda: _load_out(ctx, counter.resolve(ctx, load_id, proof)))


# --- POS devices ---------------------------------------------------------------------------

_RENAMED = {
    "amount": "amount_fen",
    "balance_before": "balance_before_fen",
    "balance_after": "balance_after_fen",
}


@endpoint(
    pos_bp,
    "/records",
    "POST",
    summary="Upload a batch of tap records (idempotent)",
    roles=("pos",),
    body=s.UploadIn,
    response=s.UploadOut,
)
def upload_records(ctx: Context, body: s.UploadIn) -> s.UploadOut:
    records = []
    for record in body.records:
        row = record.model_dump()
        row.pop("operator")
        row = {_RENAMED.get(k, k): v for k, v in row.items()}
        for name in ("terminal_id", "card_serial", "tac", "mac2"):
            row[name] = row[name].upper()
        row["occurred_at"] = row["occurred_at"].replace(tzinfo=None)
        records.append(row)
    result = pos_api.upload(ctx, records)
    return s.UploadOut(
        accepted=result.accepted,
        duplicate=result.duplicate,
        rejected=[s.Rejected(**r) for r in result.rejected],
    )


@endpoint(
    pos_bp,
    "/blacklist",
    "GET",
    summary="Blacklist: full, or changes since version N",
    roles=("pos", "admin"),
    query=s.BlacklistQuery,
    response=s.BlacklistOut,
)
def get_blacklist(ctx: Context, query: s.BlacklistQuery) -> s.BlacklistOut:
    version, full, added, removed = cards.blacklist_since(ctx, query.since)
    return s.BlacklistOut(version=version, full=full, add=added, remove=removed)


@endpoint(
    pos_bp,
    "/heartbeat",
    "POST",
    summary="Device heartbeat with its status",
    roles=("pos",),
    body=s.HeartbeatIn,
    response=s.DeviceStatus,
)
def heartbeat(ctx: Context, body: s.HeartbeatIn) -> s.DeviceStatus:
    device = pos_api.heartbeat(
        ctx,
        firmware=body.firmware,
        blacklist_version=body.blacklist_version,
        records_pending=body.records_pending,
        last_upload_at=body.last_upload_at.replace(tzinfo=None) if body.last_upload_at else None,
        psam_seq=body.psam_seq,
    )
    version = cards.blacklist_since(ctx, 0)[0]
    return s.DeviceStatus(
        terminal_id=device.terminal_id,
        online=True,
        last_heartbeat_at=device.last_heartbeat_at,
        firmware=device.firmware,
        records_pending=device.records_pending,
        last_upload_at=device.last_upload_at,
        psam_seq=device.psam_seq,
        blacklist_version=device.blacklist_version,
        blacklist_lag=version - (device.blacklist_version or 0),
    )


# --- ledger --------------------------------------------------------------------------------


@endpoint(
    ledger_bp,
    "",
    "GET",
    summary="Accounts and the balance check",
    roles=ADMIN,
    response=s.LedgerOut,
)
def ledger_view(ctx: Context) -> s.LedgerOut:
    from sqlalchemy import select

    try:
        ledger.check_balanced(ctx.session)
        balanced = True
    except AssertionError:
        balanced = False
    accounts = ctx.session.scalars(select(Account).order_by(Account.code))
    return s.LedgerOut(
        balanced=balanced,
        accounts=[
            s.LedgerAccount(
                code=a.code, kind=a.kind, debits_fen=a.debits_fen, credits_fen=a.credits_fen
            )
            for a in accounts
        ],
    )


# --- clearing and settlement ---------------------------------------------------------------

clearing_bp = Blueprint("clearing", __name__, url_prefix="/api/v1/clearing")
BLUEPRINTS = (*BLUEPRINTS, clearing_bp)


@endpoint(
    clearing_bp,
    "/runs",
    "POST",
    summary="Clear a business day (safe to re-run: nothing posts twice)",
    roles=ADMIN,
    body=s.ClearingRunIn,
    response=s.ClearingRunOut,
    status=201,
)
def run_clearing(ctx: Context, body: s.ClearingRunIn) -> s.ClearingRunOut:
    from wallet_service.services import clearing

    return s.ClearingRunOut(**clearing.run(ctx, body.date).__dict__)


@endpoint(
    clearing_bp,
    "/days/<day>",
    "GET",
    summary="A business day's clearing: totals by dimension, exceptions",
    roles=ADMIN,
    response=s.ClearingDayOut,
)
def clearing_day(ctx: Context, day: str) -> s.ClearingDayOut:
    from wallet_service.services import clearing

    return s.ClearingDayOut(**clearing.day_report(ctx, _date(day)))


@endpoint(
    registry_bp,
    "/operators/<operator>/settlements/<day>",
    "GET",
    summary="Settlement statements of a bus company for a business day",
    roles=REGISTRY,
    response=s.StatementsOut,
)
def settlement_statements(ctx: Context, operator: str, day: str) -> s.StatementsOut:
    from wallet_service.services import clearing

    rows = clearing.statements(ctx, operator, _date(day))
    return s.StatementsOut(operator=operator, business_date=_date(day), statements=rows)


def _date(text: str):  # type: ignore[no-untyped-def]
    from datetime import date as date_type

    from wallet_service.errors import InvalidInput

    try:
        return date_type.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"not a date (YYYY-MM-DD): {text!r}") from None


# --- statistics, record query, CSV ---------------------------------------------------------


def _record_filter(query: s.RecordQuery):  # type: ignore[no-untyped-def]
    from wallet_service.services.reports import RecordFilter

    return RecordFilter(
        card=query.card,
        start=query.start,
        end=query.end,
        route=query.route,
        vehicle=query.vehicle,
        driver=query.driver,
        device=query.device,
    )


@endpoint(
    registry_bp,
    "/operators/<operator>/stats",
    "GET",
    summary="Rides and revenue by hour, day, route, vehicle or driver",
    roles=REGISTRY,
    query=s.StatsQuery,
    response=s.StatsOut,
)
def operator_stats(ctx: Context, operator: str, query: s.StatsQuery) -> s.StatsOut:
    from wallet_service.services import reports

    rows = reports.statistics(ctx, operator, query.by, _record_filter(query))
    return s.StatsOut(by=query.by, rows=rows)


@endpoint(
    registry_bp,
    "/operators/<operator>/records",
    "GET",
    summary="Tap records, filtered, keyset-paginated (pass next_after_id as after_id)",
    roles=REGISTRY,
    query=s.PageQuery,
    response=s.RecordPage,
)
def operator_records(ctx: Context, operator: str, query: s.PageQuery) -> s.RecordPage:
    from wallet_service.services import reports

    page, next_after = reports.query_records(
        ctx, operator, _record_filter(query), query.after_id, query.limit
    )
    return s.RecordPage(records=page, next_after_id=next_after)


@endpoint(
    registry_bp,
    "/operators/<operator>/records.csv",
    "GET",
    summary="Tap records as CSV, streamed",
    roles=REGISTRY,
    query=s.RecordQuery,
    media_type="text/csv",
)
def operator_records_csv(ctx: Context, operator: str, query: s.RecordQuery):  # type: ignore[no-untyped-def]
    from flask import Response, current_app, stream_with_context

    from wallet_service.services import reports
    from wallet_service.services.registry import operator_by_code

    operator_id = operator_by_code(ctx, operator).id
    record_filter = _record_filter(query)
    database = current_app.extensions["database"]

    # Its own read transactions: the request's has ended when the body streams.
    lines = reports.csv_lines(database.run, operator_id, record_filter)
    headers = {"Content-Disposition": f'attachment; filename="{operator}-records.csv"'}
    return Response(stream_with_context(lines), mimetype="text/csv", headers=headers)


# --- bank callbacks ------------------------------------------------------------------------

bank_bp = Blueprint("bank", __name__, url_prefix="/api/v1/bank")
BLUEPRINTS = (*BLUEPRINTS, bank_bp)


@endpoint(
    bank_bp,
    "/webhooks",
    "POST",
    summary="Bank callbacks (Standard Webhooks signature; stored before 2xx, deduplicated)",
    roles=("bank",),
    response=s.WebhookAck,
    signed_webhook=True,
    one_statement=True,  # (stored once: bank_webhooks._stored_once)
)
def bank_webhook(ctx: Context, raw_body: bytes, headers: dict[str, str]) -> s.WebhookAck:
    from flask import current_app

    from wallet_service.services import bank_webhooks

    secret = current_app.config.get("BANK_WEBHOOK_SECRET")
    return s.WebhookAck(**bank_webhooks.receive(ctx, secret, raw_body, headers))


@endpoint(
    bank_bp,
    "/reconciliation/<day>",
    "POST",
    summary="Three-way match of a day's bank statement, top-up orders and loads",
    roles=ADMIN,
    body=s.ReconcileIn,
    response=s.ReconcileOut,
)
def reconcile_topups(ctx: Context, day: str, body: s.ReconcileIn) -> s.ReconcileOut:
    from wallet_service.services import reconciliation

    return s.ReconcileOut(**reconciliation.reconcile(ctx, _date(day), body.statement_csv))


@endpoint(
    cards_bp,
    "/<serial>/topups",
    "GET",
    summary="A card's over-the-air top-up orders, newest first",
    roles=COUNTER,
    response=s.TopUpList,
)
def card_topups(ctx: Context, serial: str) -> s.TopUpList:
    from wallet_service.services import topups

    card = cards.card_by_serial(ctx, serial)
    return s.TopUpList(
        orders=[
            s.TopUpOut.model_validate(o, from_attributes=True)
            for o in topups.orders_of(ctx, card.serial)
        ]
    )


@endpoint(
    cards_bp,
    "/<serial>/topups/<reference>/settle-unproven",
    "POST",
    summary="Refund a lost card's top-up whose CREDIT can no longer be proven",
    roles=ADMIN,
    body=s.SettleUnprovenIn,
    response=s.TopUpOut,
)
def settle_unproven_topup(
    ctx: Context, serial: str, reference: str, body: s.SettleUnprovenIn
) -> s.TopUpOut:
    from wallet_service.services import topups

    order = topups.settle_unproven(ctx, serial, reference, body.reason)
    return s.TopUpOut.model_validate(order, from_attributes=True)


@endpoint(
    cards_bp,
    "/<serial>/ota-rekey",
    "POST",
    summary="Replace the SIM's OTA keyset by the next key version, over the air",
    roles=ADMIN,
    response=s.RekeyOut,
    status=202,
)
def request_rekey(ctx: Context, serial: str) -> s.RekeyOut:
    from wallet_service.services import rekeys

    return s.RekeyOut.model_validate(rekeys.request(ctx, serial), from_attributes=True)


@endpoint(
    cards_bp,
    "/<serial>/ota-rekey",
    "GET",
    summary="The card's latest OTA rekey",
    roles=ADMIN,
    response=s.RekeyOut,
)
def latest_rekey(ctx: Context, serial: str) -> s.RekeyOut:
    from wallet_service.errors import NotFound
    from wallet_service.services import rekeys

    card = cards.card_by_serial(ctx, serial)
    rekey = rekeys.latest(ctx, card.serial)
    if rekey is None:
        raise NotFound("this card was never rekeyed")
    return s.RekeyOut.model_validate(rekey, from_attributes=True)
