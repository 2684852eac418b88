"""Counter top-up: the real online load (card-application.md §2–§3), the platform holding
the keys and the counter terminal holding the phone.

1. ``authorize``: the terminal sends the card's INITIALIZE FOR LOAD answer; MAC1 is
   verified, a pending load is recorded, MAC2 (with the platform's date and time) returned.
2. ``confirm``: the terminal reports the TAC from CREDIT FOR LOAD; verified, then posted
   hall cash → card float, once.
3. ``resolve``: no TAC came back; the terminal asks the card GET TRANSACTION PROVE and
   reports the proof (loaded) or `69 85` (not loaded). None lost, none doubled.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sqlalchemy import func, select

from sim_applet.crypto import Algorithm
from sim_applet.issuer import LoadAuthorization, Mac1Invalid, authorize_load
from sim_applet.structures import InitializeForLoadResponse, bcd_date, bcd_time
from wallet_service import audit, ledger
from wallet_service.errors import CardRefused, Conflict, InvalidInput, LimitExceeded, NotFound
from wallet_service.models import BusinessHall, Card, CounterLoad
from wallet_service.services.cards import card_by_serial
from wallet_service.services.registry import Context

load_amount_fen_max = 100_000  # the card's own balance limit caps it further


@dataclass(frozen=True)
class Authorized:
    load_id: int
    mac2: str
    date: str
    time: str


def _hall(ctx: Context) -> BusinessHall:
    ctx.principal.require("counter")
    hall = ctx.session.scalar(
        select(BusinessHall).where(BusinessHall.id == ctx.principal.hall_id).with_for_update()
    )
    assert hall is not None
    return hall


def authorize(
    ctx: Context, serial: str, amount_fen: int, terminal_id: bytes, init_response: bytes
) -> Authorized:
    hall = _hall(ctx)
    if not 0 < amount_fen <= load_amount_fen_max:
        raise InvalidInput(f"amount_fen must be 1..{load_amount_fen_max}")
    card = card_by_serial(ctx, serial, lock=True)
    if card.status != "active":
        raise Conflict(f"card {card.serial} is {card.status}: no loads")
    try:
        answer = InitializeForLoadResponse.decode(init_response)
    except ValueError as error:
        raise InvalidInput(f"init_response: {error}") from None
    _settle_earlier_pending(ctx, card.id, answer.online_ctc)
    _check_daily_limit(ctx, hall, amount_fen)
    try:
        authorization = authorize_load(
            ctx.keys.issuer_keys(), bytes.fromhex(card.serial), amount_fen, terminal_id, answer
        )
    except Mac1Invalid:
        audit.record(ctx.session, ctx.principal.name, "load.mac1_invalid", card.serial, ctx.now)
        raise CardRefused("MAC1 does not verify: wrong or cloned card") from None
    date_bcd, time_bcd = bcd_date(ctx.now), bcd_time(ctx.now)
    load = CounterLoad(
        card_id=card.id,
        hall_id=hall.id,
        amount_fen=amount_fen,
        terminal_id=terminal_id.hex().upper(),
        old_balance_fen=answer.old_balance,
        online_ctc=answer.online_ctc,
        card_random=answer.random.hex(),
        key_version=answer.key_version,
        algorithm=int(answer.algorithm),
        date_bcd=date_bcd.hex(),
        time_bcd=time_bcd.hex(),
        state="pending",
        business_date=ctx.now.date(),
        created_at=ctx.now,
    )
    ctx.session.add(load)
    ctx.session.flush()
    audit.record(
        ctx.session,
        ctx.principal.name,
        "load.authorize",
        card.serial,
        ctx.now,
        load_id=load.id,
        amount_fen=amount_fen,
    )
    return Authorized(
        load.id,
        authorization.mac2(date_bcd, time_bcd).hex().upper(),
        date_bcd.hex(),
        time_bcd.hex(),
    )


def _settle_earlier_pending(ctx: Context, card_id: int, online_ctc: int) -> None:
    """A new INITIALIZE shows the card's online CTC: an earlier pending load with the same
    CTC provably never credited (the card counts only successes). One with a lower CTC may
    have: it must be resolved with GET TRANSACTION PROVE first."""
    for pending in ctx.session.scalars(
        select(CounterLoad).where(CounterLoad.card_id == card_id, CounterLoad.state == "pending")
    ):
        if pending.online_ctc == online_ctc:
            pending.state, pending.resolved_at = "failed", ctx.now
        else:
            raise Conflict(
                f"load {pending.id} on this card is unresolved: send its GET TRANSACTION PROVE "
                "result to /resolve first",
                load_id=pending.id,
            )


def _check_daily_limit(ctx: Context, hall: BusinessHall, amount_fen: int) -> None:
    used = ctx.session.scalar(
        select(func.coalesce(func.sum(CounterLoad.amount_fen), 0)).where(
            CounterLoad.hall_id == hall.id,
            CounterLoad.business_date == ctx.now.date(),
            CounterLoad.state.in_(("pending", "loaded")),
        )
    )
    if used + amount_fen > hall.daily_limit_fen:
        raise LimitExceeded(
            f"daily limit of {hall.code} reached", used_fen=used, limit_fen=hall.daily_limit_fen
        )


def _load_for_update(ctx: Context, load_id: int) -> CounterLoad:
    load = ctx.session.scalar(
        select(CounterLoad).where(CounterLoad.id == load_id).with_for_update()
    )
    if load is None or load.hall_id != ctx.principal.hall_id:
        raise NotFound(f"no load {load_id}")
    return load


def _expected_tac(ctx: Context, load: CounterLoad) -> bytes:
    card_answer = InitializeForLoadResponse(
        load.old_balance_fen,
        load.online_ctc,
        load.key_version,
        Algorithm(load.algorithm),
        bytes.fromhex(load.card_random),
        b"\x00" * 4,
    )
    serial = bytes.fromhex(ctx.session.get_one(Card, load.card_id).serial)
    authorization = LoadAuthorization(
        serial, load.amount_fen, bytes.fromhex(load.terminal_id), card_answer, b""
    )
    return authorization.expected_tac(
        ctx.keys.issuer_keys(), bytes.fromhex(load.date_bcd), bytes.fromhex(load.time_bcd)
    )


def confirm(ctx: Context, load_id: int, tac: bytes) -> CounterLoad:
    _hall(ctx)
    load = _load_for_update(ctx, load_id)
    if load.state == "loaded":
        if load.tac == tac.hex().upper():
            return load  # the same confirmation again
        raise Conflict(f"load {load_id} is already confirmed with another TAC")
    if load.state == "failed":
        raise Conflict(f"load {load_id} failed; it cannot be confirmed")
    if not hmac.compare_digest(_expected_tac(ctx, load), tac):
        audit.record(ctx.session, ctx.principal.name, "load.tac_invalid", str(load.id), ctx.now)
        raise CardRefused("the TAC does not verify")
    _post(ctx, load, tac)
    return load


def resolve(ctx: Context, load_id: int, proof_tac: bytes | None) -> CounterLoad:
    """``proof_tac``: the TAC from GET TRANSACTION PROVE, or None when the card answered
    `69 85` (the load did not happen)."""
    _hall(ctx)
    load = _load_for_update(ctx, load_id)
    if load.state != "pending":
        if proof_tac is not None and load.state == "loaded" and load.tac == proof_tac.hex().upper():
            return load
        if proof_tac is None and load.state == "failed":
            return load
        raise Conflict(f"load {load_id} is already {load.state}")
    if proof_tac is None:
        load.state, load.resolved_at = "failed", ctx.now
        audit.record(ctx.session, ctx.principal.name, "load.not_loaded", str(load.id), ctx.now)
        return load
    if not hmac.compare_digest(_expected_tac(ctx, load), proof_tac):
        raise CardRefused("the proof's TAC does not verify")
    _post(ctx, load, proof_tac)
    return load


def _post(ctx: Context, load: CounterLoad, tac: bytes) -> None:
    hall = ctx.session.get_one(BusinessHall, load.hall_id)
    card = ctx.session.get_one(Card, load.card_id)
    ledger.post(
        ctx.session,
        debit=ledger.open_account(ctx.session, ledger.HALL_CASH, hall.code),
        credit=ledger.open_account(ctx.session, ledger.CARD_FLOAT, card.serial),
        amount_fen=load.amount_fen,
        kind="counter_load",
        reference=f"counter_load:{load.id}",
        at=ctx.now,
    )
    load.state, load.tac, load.resolved_at = "loaded", tac.hex().upper(), ctx.now
    audit.record(
        ctx.session,
        ctx.principal.name,
        "load.confirmed",
        card.serial,
        ctx.now,
        load_id=load.id,
        amount_fen=load.amount_fen,
    )
