"""Card lifecycle: issue a mobile bus card to a phone, activate it, register its holder,
report it lost (hot list), re-issue it with the remaining balance, close it with a refund.

The platform's view of a card's money is its card-float account: counter and OTA loads
credit it, cleared fares (the clearing issue) debit it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import String, bindparam, event, func, inspect, select
from sqlalchemy.orm import Session

from sim_applet.crypto import Algorithm
from sim_applet.personalize import personalize
from wallet_service import audit, ledger
from wallet_service.db import transaction_cache
from wallet_service.errors import Conflict, InvalidInput, NotFound
from wallet_service.models import BlacklistChange, BusinessHall, Card, TopUpOrder
from wallet_service.services.registry import Context

SERIAL_PREFIX = bytes.fromhex("2026")  # project-defined issuer range for application serials
serial_attempts_max = 10


@dataclass(frozen=True)
class CardView:
    serial: str
    iccid: str
    phone: str
    status: str
    algorithm: str
    holder_name: str | None
    holder_id_masked: str | None
    balance_fen: int
    image_file: str


def mask_id(number: str | None) -> str | None:
    if not number:
        return None
    return number[:3] + "*" * max(len(number) - 7, 1) + number[-4:]


def view(ctx: Context, card: Card) -> CardView:
    account = ledger.open_account(ctx.session, ledger.CARD_FLOAT, card.serial)
    return CardView(
        card.serial,
        card.iccid,
        card.phone,
        card.status,
        card.algorithm,
        card.holder_name,
        mask_id(card.holder_id_number),
        ledger.balance(account),
        card.image_file,
    )


# Built once: the worker asks it for most SMS (built per call, a statement's expression
# tree and cache key cost more CPU than running it).
_CARD_BY_SERIAL = select(Card).where(Card.serial == bindparam("serial", type_=String))
_CARD_BY_SERIAL_LOCKED = _CARD_BY_SERIAL.with_for_update()


def find_card(session: Session, serial: str, *, lock: bool = False) -> Card | None:
    if not lock:
        loaded = session.info.get(_LOADED, {}).get(serial.upper())
        if loaded is not None and _current(loaded):
            return loaded
    statement = _CARD_BY_SERIAL_LOCKED if lock else _CARD_BY_SERIAL
    return session.scalar(statement, {"serial": serial.upper()})


# The cards a session has loaded, by serial: ``find_card`` answers from them without a
# query. A query would return the same object anyway (the ORM does not refresh what its
# transaction has loaded); the worker's batches look a card up three or four times.
_LOADED = "cards_loaded_by_serial"


@event.listens_for(Card, "load")
def _remember_loaded(card: Card, context) -> None:  # type: ignore[no-untyped-def]
    transaction_cache(context.session, _LOADED, dict)[card.serial] = card


def _current(card: Card) -> bool:
    """Still in the session and not expired (a rollback, or an explicit expire: the next
    look asks the database)."""
    state = inspect(card)
    return state.persistent and not state.expired_attributes


def card_by_serial(ctx: Context, serial: str, *, lock: bool = False) -> Card:
    card = find_card(ctx.session, serial, lock=lock)
    if card is None:
        raise NotFound(f"no card {serial}")
    return card


def _new_serial(ctx: Context) -> bytes:
    for _ in range(serial_attempts_max):
        serial = SERIAL_PREFIX + secrets.token_bytes(8)
        if ctx.session.scalar(select(Card.id).where(Card.serial == serial.hex().upper())) is None:
            return serial
    raise AssertionError("no free application serial number")


def issue(
    ctx: Context, iccid: str, phone: str, algorithm: str = "3des", balance_fen: int = 0
) -> Card:
    """Personalize a SIM image for the phone's SIM and register the card (status issued).
    ``balance_fen`` is only for re-issue, which moves money into it on the ledger."""
    ctx.principal.require("admin", "counter")
    if ctx.session.scalar(select(Card.id).where(Card.iccid == iccid)) is not None:
        raise Conflict(f"a card is already issued to SIM {iccid}")
    serial = _new_serial(ctx)
    sim = personalize(
        serial,
        issuer=ctx.keys.issuer_keys(),
        algorithm=Algorithm.from_name(algorithm),
        iccid=iccid,
        balance_fen=balance_fen,
        ota_masters=ctx.keys.ota_masters(),
    )
    image_file = f"sim-{serial.hex().upper()}.json"
    sim.save(ctx.output_dir / image_file)
    card = Card(
        serial=serial.hex().upper(),
        iccid=iccid,
        phone=phone,
        algorithm=algorithm,
        status="issued",
        issued_at=ctx.now,
        image_file=image_file,
    )
    ctx.session.add(card)
    ctx.session.flush()
    ledger.open_account(ctx.session, ledger.CARD_FLOAT, card.serial)
    audit.record(
        ctx.session,
        ctx.principal.name,
        "card.issue",
        card.serial,
        ctx.now,
        iccid=iccid,
        phone=phone,
    )
    return card


def activate(ctx: Context, serial: str) -> Card:
    ctx.principal.require("admin", "counter")
    card = card_by_serial(ctx, serial, lock=True)
    if card.status != "issued":
        raise Conflict(f"card {card.serial} is {card.status}, not issued")
    # (A concurrent twin is stopped by the unique index cards_one_active_per_phone: the
    # retry then finds it here.)
    other = ctx.session.scalar(
        select(Card.serial).where(Card.phone == card.phone, Card.status == "active")
    )
    if other is not None:
        raise Conflict(
            f"phone {card.phone} already has an active card {other}: report it lost or "
            "close it first (a phone's SMS name one card)"
        )
    card.status, card.activated_at = "active", ctx.now
    audit.record(ctx.session, ctx.principal.name, "card.activate", card.serial, ctx.now)
    return card


def register_holder(ctx: Context, serial: str, name: str, id_type: str, id_number: str) -> Card:
    ctx.principal.require("admin", "counter")
    card = card_by_serial(ctx, serial, lock=True)
    if card.status in ("closed", "replaced"):
        raise Conflict(f"card {card.serial} is {card.status}")
    card.holder_name, card.holder_id_type, card.holder_id_number = name, id_type, id_number
    audit.record(
        ctx.session,
        ctx.principal.name,
        "card.register_holder",
        card.serial,
        ctx.now,
        id_type=id_type,
        id_number=mask_id(id_number),
    )
    return card


def _check_identity(card: Card, id_number: str) -> None:
    if not card.holder_id_number:
        raise Conflict("an anonymous card cannot be reported lost: register the holder first")
    if not secrets.compare_digest(card.holder_id_number, id_number):
        raise InvalidInput("the id number does not match the card's holder")


def blacklist(ctx: Context, serial: str, action: str, reason: str) -> BlacklistChange:
    change = BlacklistChange(card_serial=serial, action=action, reason=reason, created_at=ctx.now)
    ctx.session.add(change)
    ctx.session.flush()
    return change


def report_loss(ctx: Context, serial: str, id_number: str) -> Card:
    """At the counter, with the holder's id: the card goes on the hot list, and every POS
    that downloads it will block the card at its next tap."""
    ctx.principal.require("admin", "counter")
    card = card_by_serial(ctx, serial, lock=True)
    _check_identity(card, id_number)
    return mark_lost(ctx, card, ctx.principal.name)


def mark_lost(ctx: Context, card: Card, actor: str) -> Card:
    """Lost: on the hot list for every POS. Reached at the counter (with the holder's id)
    or from the phone's menu (with the card's PIN and key)."""
    if card.status not in ("issued", "active"):
        raise Conflict(f"card {card.serial} is {card.status}")
    card.status = "lost"
    blacklist(ctx, card.serial, "add", "reported lost")
    audit.record(ctx.session, actor, "card.report_loss", card.serial, ctx.now)
    return card


def reissue(ctx: Context, serial: str, id_number: str, new_iccid: str, phone: str) -> Card:
    """A lost card's remaining platform balance moves to a new card, personalized with it.
    Fares the old card made before the loss report and that arrive later are still
    cleared against the old card's float (shown as adjustments there)."""
    card = card_by_serial(ctx, serial, lock=True)
    _check_identity(card, id_number)
    if card.status != "lost":
        raise Conflict("only a card reported lost can be re-issued")
    _no_load_unsettled(ctx, card)
    old_float = ledger.open_account(ctx.session, ledger.CARD_FLOAT, card.serial)
    remaining = ledger.balance(old_float)
    new_card = issue(ctx, new_iccid, phone, card.algorithm, max(remaining, 0))
    new_card.holder_name = card.holder_name
    new_card.holder_id_type, new_card.holder_id_number = card.holder_id_type, card.holder_id_number
    if remaining > 0:
        ledger.post(
            ctx.session,
            debit=old_float,
            credit=ledger.open_account(ctx.session, ledger.CARD_FLOAT, new_card.serial),
            amount_fen=remaining,
            kind="reissue",
            reference=f"reissue:{card.serial}",
            at=ctx.now,
        )
    card.status, card.replaced_by_id = "replaced", new_card.id
    audit.record(
        ctx.session,
        ctx.principal.name,
        "card.reissue",
        card.serial,
        ctx.now,
        new_serial=new_card.serial,
        moved_fen=remaining,
    )
    return new_card


def _no_load_unsettled(ctx: Context, card: Card) -> None:
    """A card whose over-the-air CREDIT may have run is not re-issued or closed until its
    phone's proof settles it: its float would move without that load, and the old SIM's
    proof would then find no card. Its orders not that far go to a refund now: a late
    answer to their packet 1 is then stale, never a CREDIT to a closed card. (The orders
    under way are locked first: one the worker is moving past INITIALIZE is read as it
    commits — a deadlock with the worker is retried by Database.run.)"""
    from wallet_service.services.topups import (  # (topups imports this module)
        CREDIT_MAY_HAVE_RUN,
        IN_FLIGHT,
        to_refund,
    )

    orders = ctx.session.scalars(
        select(TopUpOrder)
        .where(TopUpOrder.card_serial == card.serial, TopUpOrder.state.in_(IN_FLIGHT))
        .with_for_update()
    ).all()
    if any(order.state in CREDIT_MAY_HAVE_RUN for order in orders):
        raise Conflict(
            f"card {card.serial} has an over-the-air top-up being settled (its CREDIT may "
            "have run): again once the phone has answered"
        )
    for order in orders:
        to_refund(ctx, order, "the card was closed or re-issued")


def close(ctx: Context, serial: str, id_number: str) -> tuple[Card, int]:
    """Close the card and refund its platform balance in cash at this counter."""
    ctx.principal.require("counter")
    card = card_by_serial(ctx, serial, lock=True)
    _check_identity(card, id_number)
    if card.status in ("closed", "replaced"):
        raise Conflict(f"card {card.serial} is {card.status}")
    _no_load_unsettled(ctx, card)
    hall = ctx.session.get(BusinessHall, ctx.principal.hall_id)
    assert hall is not None
    card_float = ledger.open_account(ctx.session, ledger.CARD_FLOAT, card.serial)
    refund = ledger.balance(card_float)
    if refund > 0:
        ledger.post(
            ctx.session,
            debit=card_float,
            credit=ledger.open_account(ctx.session, ledger.HALL_CASH, hall.code),
            amount_fen=refund,
            kind="refund",
            reference=f"close:{card.serial}",
            at=ctx.now,
        )
    if card.status != "lost":
        blacklist(ctx, card.serial, "add", "closed")
    card.status = "closed"
    audit.record(
        ctx.session, ctx.principal.name, "card.close", card.serial, ctx.now, refund_fen=refund
    )
    return card, refund


def blacklist_since(ctx: Context, since: int) -> tuple[int, bool, list[str], list[str]]:
    """(current version, full?, added, removed). ``since`` 0 gives the full list."""
    current = ctx.session.scalar(select(func.coalesce(func.max(BlacklistChange.version), 0)))
    changes = ctx.session.scalars(
        select(BlacklistChange)
        .where(BlacklistChange.version > since)
        .order_by(BlacklistChange.version)
    )
    state: dict[str, str] = {}
    for change in changes:
        state[change.card_serial] = change.action
    added = sorted(serial for serial, action in state.items() if action == "add")
    removed = sorted(serial for serial, action in state.items() if action == "remove")
    return current, since == 0, added, [] if since == 0 else removed
