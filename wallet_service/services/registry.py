"""The bus company's registry: operators, fleets, routes, vehicles, drivers, driver cards,
POS devices (with the PSAM the platform provisions), business halls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sim_applet.driver_card import DriverData
from sim_applet.personalize import personalize_driver_card
from wallet_service import audit, ledger
from wallet_service.auth import Principal
from wallet_service.errors import Conflict, NotFound
from wallet_service.keystore import KeyStore
from wallet_service.models import (
    ApiToken,
    BusinessHall,
    Driver,
    DriverCard,
    Fleet,
    Operator,
    PosDevice,
    Route,
    Vehicle,
)


@dataclass(frozen=True)
class Context:
    """What every service call needs besides its arguments."""

    session: Session
    principal: Principal
    now: datetime
    keys: KeyStore
    output_dir: Path  # personalization files: SIM images, PSAM files (never API answers)

    @classmethod
    def for_platform(cls, session: Session, config: Any) -> Context:
        """The platform's own work (the OTA worker, the command line): as an admin, at the
        app's clock, with its keys and personalization folder."""
        return cls(
            session,
            Principal(0, "admin"),
            config["CLOCK"](),
            config["KEY_STORE"],
            Path(config["PERSONALIZATION_DIR"]),
        )


def _unique(session: Session, model, **where: Any) -> None:  # type: ignore[no-untyped-def]
    query = select(model.id).filter_by(**where)
    if session.scalar(query) is not None:
        raise Conflict(f"{model.__tablename__[:-1].replace('_', ' ')} exists", **where)


def operator_by_code(ctx: Context, code: str) -> Operator:
    operator = ctx.session.scalar(select(Operator).where(Operator.code == code))
    if operator is None:
        raise NotFound(f"no operator {code!r}")
    ctx.principal.require_operator(operator.id)
    return operator


def create_operator(ctx: Context, code: str, name: str, fee_rate_bp: int) -> Operator:
    ctx.principal.require("admin")
    _unique(ctx.session, Operator, code=code)
    operator = Operator(code=code, name=name, fee_rate_bp=fee_rate_bp)
    ctx.session.add(operator)
    ctx.session.flush()
    ledger.open_account(ctx.session, ledger.OPERATOR_PAYABLE, code)
    audit.record(ctx.session, ctx.principal.name, "operator.create", code, ctx.now, name=name)
    return operator


def create_hall(
    ctx: Context, code: str, name: str, kind: str, daily_limit_fen: int
) -> BusinessHall:
    ctx.principal.require("admin")
    _unique(ctx.session, BusinessHall, code=code)
    hall = BusinessHall(code=code, name=name, kind=kind, daily_limit_fen=daily_limit_fen)
    ctx.session.add(hall)
    ctx.session.flush()
    ledger.open_account(ctx.session, ledger.HALL_CASH, code)
    audit.record(ctx.session, ctx.principal.name, "hall.create", code, ctx.now, kind=kind)
    return hall


def _child(ctx: Context, model, operator: Operator, code: str):  # type: ignore[no-untyped-def]
    found = ctx.session.scalar(
        select(model).where(model.operator_id == operator.id, model.code == code)
    )
    if found is None:
        raise NotFound(f"no {model.__tablename__[:-1]} {code!r} in {operator.code}")
    return found


def create_fleet(ctx: Context, operator_code: str, code: str, name: str) -> Fleet:
    operator = operator_by_code(ctx, operator_code)
    _unique(ctx.session, Fleet, operator_id=operator.id, code=code)
    fleet = Fleet(operator_id=operator.id, code=code, name=name)
    ctx.session.add(fleet)
    ctx.session.flush()
    audit.record(
        ctx.session, ctx.principal.name, "fleet.create", f"{operator_code}/{code}", ctx.now
    )
    return fleet


def create_route(ctx: Context, operator_code: str, code: str, name: str, fare_fen: int) -> Route:
    operator = operator_by_code(ctx, operator_code)
    _unique(ctx.session, Route, operator_id=operator.id, code=code)
    route = Route(operator_id=operator.id, code=code, name=name, fare_fen=fare_fen)
    ctx.session.add(route)
    ctx.session.flush()
    audit.record(
        ctx.session,
        ctx.principal.name,
        "route.create",
        f"{operator_code}/{code}",
        ctx.now,
        fare_fen=fare_fen,
    )
    return route


def create_vehicle(
    ctx: Context,
    operator_code: str,
    code: str,
    plate: str,
    fleet_code: str,
    route_code: str | None,
) -> Vehicle:
    operator = operator_by_code(ctx, operator_code)
    _unique(ctx.session, Vehicle, operator_id=operator.id, code=code)
    fleet = _child(ctx, Fleet, operator, fleet_code)
    route = _child(ctx, Route, operator, route_code) if route_code else None
    vehicle = Vehicle(
        operator_id=operator.id,
        code=code,
        plate=plate,
        fleet_id=fleet.id,
        route_id=route.id if route else None,
    )
    ctx.session.add(vehicle)
    ctx.session.flush()
    audit.record(
        ctx.session, ctx.principal.name, "vehicle.create", f"{operator_code}/{code}", ctx.now
    )
    return vehicle


def create_driver(
    ctx: Context, operator_code: str, code: str, name: str, fleet_code: str
) -> Driver:
    operator = operator_by_code(ctx, operator_code)
    _unique(ctx.session, Driver, operator_id=operator.id, code=code)
    fleet = _child(ctx, Fleet, operator, fleet_code)
    driver = Driver(operator_id=operator.id, code=code, name=name, fleet_id=fleet.id)
    ctx.session.add(driver)
    ctx.session.flush()
    audit.record(
        ctx.session, ctx.principal.name, "driver.create", f"{operator_code}/{code}", ctx.now
    )
    return driver


def issue_driver_card(
    ctx: Context, operator_code: str, driver_code: str, serial: bytes, expiry: date
) -> DriverCard:
    operator = operator_by_code(ctx, operator_code)
    driver = _child(ctx, Driver, operator, driver_code)
    _unique(ctx.session, DriverCard, serial=serial.hex().upper())
    fleet = ctx.session.get(Fleet, driver.fleet_id)
    assert fleet is not None
    data = DriverData(serial, driver.code, operator.code, fleet.code, driver.name, expiry)
    image = personalize_driver_card(data, driver_master_key=ctx.keys.driver_card_master())
    image_file = f"driver-{serial.hex().upper()}.json"
    image.save(ctx.output_dir / image_file)
    card = DriverCard(
        driver_id=driver.id,
        serial=serial.hex().upper(),
        expiry=expiry,
        issued_at=ctx.now,
        image_file=image_file,
    )
    ctx.session.add(card)
    ctx.session.flush()
    audit.record(
        ctx.session,
        ctx.principal.name,
        "driver_card.issue",
        card.serial,
        ctx.now,
        driver=driver.code,
    )
    return card


def register_pos_device(
    ctx: Context, operator_code: str, vehicle_code: str, terminal_id: bytes
) -> tuple[PosDevice, str]:
    """Bind a POS to a vehicle and provision its PSAM: the PSAM file (with the purchase,
    maintenance and driver-card master keys) goes to the personalization directory, as a
    real PSAM would be written at a key-loading station, never into an API answer."""
    operator = operator_by_code(ctx, operator_code)
    vehicle = _child(ctx, Vehicle, operator, vehicle_code)
    _unique(ctx.session, PosDevice, terminal_id=terminal_id.hex().upper())
    device = PosDevice(
        operator_id=operator.id,
        vehicle_id=vehicle.id,
        terminal_id=terminal_id.hex().upper(),
        psam_key_version=1,
    )
    ctx.session.add(device)
    ctx.session.flush()
    route = ctx.session.get(Route, vehicle.route_id) if vehicle.route_id else None
    psam_file = f"pos-{device.terminal_id}.json"
    issuer = ctx.keys.issuer_keys()
    pos_config = {
        "operator": operator.code,
        "route": route.code if route else "",
        "vehicle": vehicle.code,
        "fare_fen": route.fare_fen if route else 0,
        "terminal_id": device.terminal_id,
        "record_store": f"pos-{device.terminal_id}.sqlite",
        "keys": {
            "purchase": {"1": issuer.purchase.hex()},
            "maintenance": issuer.maintenance.hex(),
            "driver_card": ctx.keys.driver_card_master().hex(),
        },
    }
    path = ctx.output_dir / psam_file
    path.write_text(json.dumps(pos_config, indent=1))
    audit.record(
        ctx.session,
        ctx.principal.name,
        "pos.register",
        device.terminal_id,
        ctx.now,
        vehicle=vehicle.code,
    )
    return device, psam_file


def retire_pos_device(
    ctx: Context, operator_code: str, terminal_id: str, reason: str
) -> tuple[PosDevice, int]:
    """Take a POS out of service for good (scrapped with its bus, broken beyond repair): its
    tokens are revoked, so it uploads nothing more — records its last heartbeat said were
    waiting are lost to clearing (the audit keeps how many). Settling a lost card's
    unproven load no longer waits for it when it was retired before the order was made.
    How many tokens were revoked comes back with it."""
    operator = operator_by_code(ctx, operator_code)
    device = ctx.session.scalars(
        select(PosDevice)
        .where(PosDevice.operator_id == operator.id, PosDevice.terminal_id == terminal_id.upper())
        .with_for_update()
    ).one_or_none()
    if device is None:
        raise NotFound(f"no POS device {terminal_id} at {operator_code}")
    if device.retired_at is not None:
        raise Conflict(f"POS {device.terminal_id} was retired at {device.retired_at}")
    device.retired_at = ctx.now
    revoked = ctx.session.execute(
        update(ApiToken)
        .where(ApiToken.device_id == device.id, ApiToken.revoked.is_(False))
        .values(revoked=True)
    ).rowcount
    audit.record(
        ctx.session,
        ctx.principal.name,
        "pos.retire",
        device.terminal_id,
        ctx.now,
        reason=reason,
        tokens_revoked=revoked,
        records_pending=device.records_pending,
        last_heartbeat_at=device.last_heartbeat_at,
    )
    return device, revoked


def list_of(ctx: Context, model, operator_code: str) -> list[Any]:  # type: ignore[no-untyped-def]
    operator = operator_by_code(ctx, operator_code)
    return list(
        ctx.session.scalars(
            select(model).where(model.operator_id == operator.id).order_by(model.id)
        )
    )
