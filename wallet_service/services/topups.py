"""Over-the-air top-up orders (ota.md §5): every paid order ends loaded exactly once or
refunded — never lost, never doubled.

    created ──bank callback──▶ paid ──packet 1: SELECT + INITIALIZE FOR LOAD──▶ init_sent
    init_sent ──PoR, MAC1 ok──▶ credit_sent (packet 2: CREDIT FOR LOAD with MAC2)
    credit_sent ──PoR, TAC ok──▶ loaded (posted: topup_pending → card float)
    credit_sent ──no PoR in time──▶ proving (packet 3: GET TRANSACTION PROVE, CTC + 1)
    proving ──proof, TAC ok──▶ loaded;  ──69 85──▶ paid again (the load did not happen)
    bad MAC1, a refusal before CREDIT, no answer to packet 1, an expired order ──▶ refunding
    refunding ──bank refund──▶ refunded (posted: topup_pending → bank settlement)

A card loads one order at a time: a paid order waits while another order of its card is
sending packets, or was paid before it (``_card_situation``). Each packet carries a step
(on the secured packet channel, its counter, which the SIM wants ever higher: one above
every packet the card has seen, whichever order or rekey sent it); a PoR for an older step
is stale and changes nothing. After CREDIT may have happened the platform never refunds
blind: it keeps proving — until an operator settles the load of a card lost days ago
(``settle_unproven``: refunded; the hot-listed SIM can spend nothing it may hold).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from sqlalchemy import (
    BigInteger,
    Exists,
    Insert,
    Integer,
    String,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import aliased

from sim_applet.crypto import Algorithm
from sim_applet.issuer import LoadAuthorization, Mac1Invalid, authorize_load
from sim_applet.structures import (
    TRANSIT_AID,
    TYPE_LOAD,
    CreditForLoadRequest,
    InitializeForLoadResponse,
    InitializeRequest,
    TransactionProof,
    bcd_date,
    bcd_time,
    get_transaction_prove,
    initialize_for_load,
    select_by_aid,
)
from sim_applet.toolkit import yuan
from wallet_service import audit, ledger
from wallet_service.db import (
    BLIND_TO_HELD_WRITES,
    as_loaded,
    transaction_cache,
    write_all_now,
    write_now,
)
from wallet_service.errors import Conflict, InvalidInput, NotFound
from wallet_service.models import (
    BankWebhookEvent,
    BlacklistChange,
    Card,
    OtaRekey,
    PosDevice,
    TapRecord,
    TopUpOrder,
)
from wallet_service.services import bank_webhooks, cards, rekeys
from wallet_service.services.registry import Context

log = logging.getLogger(__name__)
OTA_TERMINAL_ID = bytes.fromhex("0000000000F0")  # project-defined: the platform as loader
LOAD_KEY_INDEX = 1
TOPUP_PENDING, BANK = "topup_pending", "bank"
order_lifetime_s = 30 * 60
por_timeout_s = 60
init_attempts_max = 3
prove_backoff_max_s = 3600
# A lost card's unproven load is settled (refunded) by an operator no sooner than this
# after the card went on the hot list: every POS has the list by then, and the phone has
# had days to answer.
unproven_settle_wait_s = 3 * 24 * 3600
rekey_wait_s = 10
topup_amount_fen_max = 100_000
IN_FLIGHT = ("paid", "init_sent", "credit_sent", "proving")
SENDING_PACKETS = ("init_sent", "credit_sent", "proving")  # at most one per card
CREDIT_MAY_HAVE_RUN = ("credit_sent", "proving")  # never refunded blind
card_busy_wait_s = 5


class OtaChannel(Protocol):
    """Sends C-APDUs to a SIM (its PoRs come back through ``on_proof_of_receipt``) and
    text messages to the passenger's phone."""

    def send(self, phone: str, card_serial: str, step: int, apdus: list[bytes]) -> None: ...

    def notify(self, phone: str, text: str) -> None: ...


class BankClient(Protocol):
    """Refunds at the bank, idempotent by ``refund_key``. Raises ``RefundRefused`` when the
    bank says no (asking again will not help), anything else when it could not be asked."""

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str: ...


class RefundRefused(Exception):
    """The bank refused a refund (unknown payment, more than was paid): a person looks."""


class BankBusy(Exception):
    """The bank asked to be asked again later (HTTP 429, 503 …), after ``retry_after_s``
    when it said (its Retry-After)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


refund_retry_s = 60  # the bank could not be asked: again after this
refund_retry_after_s_max = 3600  # a bank's Retry-After beyond this is taken as this
BANK_NOT_ASKED = "refund: the bank could not be asked"  # (a step's outcome)
refund_refused_retry_s = 3600  # the bank said no: again (after someone looked) after this


@dataclass(frozen=True)
class WorkResult:
    order_id: int
    action: str


def reference_for(card_serial: str, request_id: str) -> str:
    """The order id the bank sees: the phone can name it from its own request."""
    return f"{card_serial}-{request_id}".upper()


# Statements the worker runs for every message or batch, built once (built per call, a
# statement's expression tree and cache key cost more CPU than running it).
_ORDER_OF_REQUEST = select(TopUpOrder).where(
    TopUpOrder.card_serial == bindparam("serial", type_=String),
    TopUpOrder.request_id == bindparam("request_id", type_=String),
)


_INSERT_ORDER_ONCE: dict[str, Insert] = {}  # by dialect, built once
_ORDERS = TopUpOrder.__table__


def _inserted_once(ctx: Context, values: dict) -> TopUpOrder | None:
    """The new order, in one statement — or None when its request has one already (a twin
    inserting at the same moment: this one waits for its commit, then inserts nothing).
    A Core INSERT returning the id, the order then made from what was inserted: the ORM's
    INSERT … RETURNING an entity costs about three times as much CPU."""
    dialect = ctx.session.get_bind().dialect.name
    if dialect not in _INSERT_ORDER_ONCE:
        dialect_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        _INSERT_ORDER_ONCE[dialect] = (
            dialect_insert(_ORDERS)
            .on_conflict_do_nothing()  # (its request's, or its reference's: they go together)
            .returning(_ORDERS.c.id)
            .execution_options(**{BLIND_TO_HELD_WRITES: True})
        )
    order_id = ctx.session.execute(_INSERT_ORDER_ONCE[dialect], values).scalar()
    if order_id is None:
        return None
    return as_loaded(ctx.session, TopUpOrder, {**values, "id": order_id})


def create_order(
    ctx: Context, card_serial: str, request_id: bytes, amount_fen: int, phone: str
) -> TopUpOrder:
    """From a verified request (the card's MAC checked by the caller). The same request
    again returns the same order; only the card in the requesting phone can be topped up."""
    if not 0 < amount_fen <= topup_amount_fen_max:
        raise InvalidInput(f"amount_fen is 1..{topup_amount_fen_max}")
    card = cards.find_card(ctx.session, card_serial)
    if card is None or card.status != "active":
        raise NotFound("no active card with this serial")
    if card.phone != phone:
        raise Conflict("a passenger tops up only the card in their own phone")
    order = _inserted_once(
        ctx,
        {
            "reference": reference_for(card.serial, request_id.hex()),
            "card_serial": card.serial,
            "request_id": request_id.hex(),
            "phone": phone,
            "amount_fen": amount_fen,
            "state": "created",
            "attempts": 0,
            "init_attempts": 0,
            "created_at": ctx.now,
            "expires_at": ctx.now + timedelta(seconds=order_lifetime_s),
            "next_action_at": ctx.now + timedelta(seconds=order_lifetime_s),
        },
    )
    if order is None:  # the same request again (a duplicated SMS, the phone retrying)
        existing = ctx.session.scalars(
            _ORDER_OF_REQUEST, {"serial": card.serial, "request_id": request_id.hex()}
        ).one()
        if existing.amount_fen != amount_fen:
            raise Conflict("this request was made for another amount")
        return existing
    audit.record(
        ctx.session,
        "sms",
        "topup.request",
        card.serial,
        ctx.now,
        order=order.reference,
        amount_fen=amount_fen,
    )
    return order


orders_listed_max = 100


def orders_of(ctx: Context, card_serial: str) -> list[TopUpOrder]:
    return list(
        ctx.session.scalars(
            select(TopUpOrder)
            .where(TopUpOrder.card_serial == card_serial)
            .order_by(TopUpOrder.id.desc())
            .limit(orders_listed_max)
        )
    )


# --- bank callbacks ------------------------------------------------------------------------


events_per_batch = 100


_UNPROCESSED_EVENTS = (
    select(BankWebhookEvent)
    .where(BankWebhookEvent.processed_at.is_(None))
    .order_by(BankWebhookEvent.received_at)
    .limit(bindparam("limit", type_=Integer))
    .with_for_update(skip_locked=True)
)


_LOCK_ORDERS_BY_REFERENCE = (  # in id order: two batches never wait for each other in a cycle
    select(TopUpOrder)
    .where(TopUpOrder.reference.in_(bindparam("references", expanding=True)))
    .order_by(TopUpOrder.id)
    .with_for_update()
)


def process_bank_events(
    ctx: Context, limit: int = events_per_batch, paid: list[TopUpOrder] | None = None
) -> int:
    """Apply stored, unprocessed bank callbacks, oldest first. Each is applied once; none
    calls the bank (a refund is a step of its own). Their orders are locked at once. With
    ``paid``, the orders now paid are put there unwritten, for ``work_batch`` to take first
    and write once with their packet 1 (the worker: one UPDATE an order, not two)."""
    events = ctx.session.scalars(_UNPROCESSED_EVENTS, {"limit": limit}).all()
    told = [(event, _event_data(ctx, event)) for event in events]
    orders = _lock_orders(ctx, {data.order_id.upper() for _, data in told if data is not None})
    with ctx.session.no_autoflush:  # (a posting's INSERT would flush the orders paid so far)
        for event, data in told:
            if data is not None:
                _apply(ctx, event, data, orders.get(data.order_id.upper()), paid)
    for event in events:  # (set after the applying, whose queries would flush each event)
        event.processed_at = ctx.now
    write_all_now(ctx.session, events)
    return len(events)


def _lock_orders(ctx: Context, references: set[str]) -> dict[str, TopUpOrder]:
    """reference → order, for those that exist (an order id the platform never made is a
    payment to send back)."""
    if not references:
        return {}
    locked = ctx.session.scalars(_LOCK_ORDERS_BY_REFERENCE, {"references": sorted(references)})
    return {order.reference: order for order in locked}


def _event_data(ctx: Context, event: BankWebhookEvent) -> bank_webhooks.EventData | None:
    try:
        return bank_webhooks.event_data(json.loads(event.payload))
    except (ValueError, InvalidInput) as error:  # stored before callbacks were checked
        audit.record(
            ctx.session, "bank", "bank_callback.unusable", event.id, ctx.now, reason=str(error)
        )
        return None


def _apply(
    ctx: Context,
    event: BankWebhookEvent,
    data: bank_webhooks.EventData,
    order: TopUpOrder | None,
    paid: list[TopUpOrder] | None,
) -> None:
    if event.event_type == "refund.succeeded":
        _refund_confirmed(ctx, order)
        return
    if order is None or order.payment_id not in (None, data.payment_id):
        # Money for an order the platform never made, or a second payment of one already
        # paid (a bank that took the order twice): it goes back, in a step of its own.
        event.refund_due_at = ctx.now
        audit.record(
            ctx.session,
            "bank",
            "topup.payment_for_unknown_order" if order is None else "topup.second_payment",
            data.order_id[:60],
            ctx.now,
            amount_fen=data.amount_fen,
            payment=data.payment_id,
        )
        return
    _paid(ctx, order, data, paid)


_UNKNOWN_PAYMENT_DUE = (
    select(BankWebhookEvent)
    .where(BankWebhookEvent.refund_due_at <= bindparam("now"))
    .order_by(BankWebhookEvent.refund_due_at)
    .limit(1)
    .with_for_update(skip_locked=True)
)


def unknown_payments_due(ctx: Context) -> Exists:
    """(An expression: the worker asks it together with others, in one query.)"""
    return exists().where(BankWebhookEvent.refund_due_at <= ctx.now)


def refund_unknown_payment_once(ctx: Context, bank: BankClient) -> str | None:
    """Refund the next payment for an unknown order, or a second payment of an order (no
    ledger posting: that money never was the platform's); None when none is due."""
    event = ctx.session.scalar(_UNKNOWN_PAYMENT_DUE, {"now": ctx.now})
    if event is None:
        return None
    data = bank_webhooks.event_data(json.loads(event.payload))  # (checked as it was applied)
    payment, amount = data.payment_id, data.amount_fen
    refund = _refund_at_bank(
        ctx, bank, payment, amount, "unknown order", f"unknown:{payment}", data.order_id
    )
    if isinstance(refund, _NotNow):
        event.refund_due_at = ctx.now + timedelta(seconds=refund.wait_s)
        return refund.outcome
    event.refund_due_at = None
    audit.record(
        ctx.session,
        "worker",
        "topup.unknown_payment_refunded",
        data.order_id[:60],
        ctx.now,
        payment=payment,
        amount_fen=amount,
        refund=refund,
    )
    return "refunded"


@dataclass(frozen=True)
class _NotNow:
    """The bank did not refund: ask again after ``wait_s``."""

    wait_s: float
    outcome: str


def _refund_at_bank(
    ctx: Context,
    bank: BankClient,
    payment_id: str,
    amount_fen: int,
    reason: str,
    refund_key: str,
    subject: str,
) -> str | _NotNow:
    """The bank's refund id — or when to ask again: an hour when it said no (audited: a
    person looks), a minute when it could not be asked. Either way the other refunds go
    on; asked again, the same key gets the same refund."""
    try:
        return bank.refund(payment_id, amount_fen, reason, refund_key)
    except RefundRefused as error:
        audit.record(
            ctx.session,
            "worker",
            "topup.refund_refused",
            subject[:60],
            ctx.now,
            refund_key=refund_key,
            reason=str(error)[:200],
        )
        return _NotNow(refund_refused_retry_s, "refund refused by the bank")
    except BankBusy as busy:  # as long as the bank asked (a minute when it did not say)
        asked_s = refund_retry_s if busy.retry_after_s is None else busy.retry_after_s
        log.warning("refund %s: the bank is busy (%s), again in %.0f s", refund_key, busy, asked_s)
        return _NotNow(min(max(asked_s, 1), refund_retry_after_s_max), BANK_NOT_ASKED)
    except Exception as error:  # unreachable, timed out, a server error
        log.warning("refund %s failed, again later: %s", refund_key, error)
        return _NotNow(refund_retry_s, BANK_NOT_ASKED)


def _paid(
    ctx: Context,
    order: TopUpOrder,
    data: bank_webhooks.EventData,
    unwritten: list[TopUpOrder] | None,
) -> None:
    amount = data.amount_fen
    late = order.state == "failed" and order.payment_id is None  # paid after it expired
    if order.state != "created" and not late:
        return  # the same payment told twice
    _post(
        ctx,
        ledger.BANK_SETTLEMENT,
        BANK,
        TOPUP_PENDING,
        "platform",
        amount,
        f"topup_paid:{order.id}",
    )
    # (Set after the posting, whose queries flush: the order is written in one UPDATE.)
    order.payment_id, order.paid_fen = data.payment_id, amount
    order.paid_at = data.paid_at or ctx.now
    if late or amount != order.amount_fen or ctx.now > order.expires_at:
        reason = "amount mismatch" if amount != order.amount_fen else "paid after it expired"
        to_refund(ctx, order, reason)  # the bank is called in a refund step of its own
        return
    order.state, order.next_action_at = "paid", ctx.now
    if unwritten is None:
        write_now(ctx.session, order)
    else:
        unwritten.append(order)


def _refund_confirmed(ctx: Context, order: TopUpOrder | None) -> None:
    """The bank did a refund: an order still refunding (the bank's answer to the refund step
    was lost) takes its refund step now — asked again under the same key, the bank answers
    with the same refund, and the step posts it and tells the passenger."""
    if order is not None and order.state == "refunding":
        order.next_action_at = ctx.now


def _post(
    ctx: Context,
    debit_kind: str,
    debit_owner: str,
    credit_kind: str,
    credit_owner: str,
    amount: int,
    reference: str,
) -> None:
    ledger.post_at_commit(  # a hot account: its total moves at commit
        ctx.session,
        debit=(debit_kind, debit_owner),
        credit=(credit_kind, credit_owner),
        amount_fen=amount,
        kind=reference.split(":")[0],
        reference=reference,
        at=ctx.now,
    )


# --- the worker ----------------------------------------------------------------------------


SENDING_STATES = (*IN_FLIGHT, "created")  # steps that only send packets (batched)
orders_per_batch = 20


def refunds_due(ctx: Context) -> Exists:
    """(An expression: the worker asks it together with others, in one query.)"""
    return exists().where(TopUpOrder.next_action_at <= ctx.now, TopUpOrder.state == "refunding")


def _due_orders(states: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """Orders whose next step is due, oldest first, claimed with SKIP LOCKED."""
    return (
        select(TopUpOrder)
        .where(TopUpOrder.next_action_at <= bindparam("now"), TopUpOrder.state.in_(states))
        .order_by(TopUpOrder.next_action_at)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
    )


_DUE_TO_SEND, _DUE_TO_REFUND = _due_orders(SENDING_STATES), _due_orders(("refunding",))
_LOCK_CARDS = (  # whole rows, read as locked: the packets' keys come from these cards
    select(Card)
    .where(Card.serial.in_(bindparam("serials", expanding=True)))
    .order_by(Card.serial)
    .with_for_update()
    .execution_options(populate_existing=True)
)


def work_batch(
    ctx: Context,
    channel: OtaChannel,
    bank: BankClient,
    limit: int = orders_per_batch,
    paid: Sequence[TopUpOrder] = (),
) -> list[WorkResult]:
    """The due packet-sending steps of up to ``limit`` orders, in one transaction (claimed
    with SKIP LOCKED: several workers share the queue; a killed worker's batch was never
    committed, and its packets never left) — those of ``paid`` first, all of them, and
    counted: orders this transaction locked and paid, not written yet
    (``process_bank_events``), each written once with its step. Until then the database
    has them as they were, so nothing here autoflushes them; and each order is written
    before the next is looked at, so the next sees it as it now is (one load of a card at
    a time)."""
    orders = sorted(paid, key=lambda order: order.id)
    with ctx.session.no_autoflush:
        if len(orders) < limit:  # (a batch holds its locks as long as it runs)
            due = ctx.session.scalars(_DUE_TO_SEND, {"now": ctx.now, "limit": limit - len(orders)})
            orders += [order for order in due if order not in orders]
        _lock_cards(ctx, [order.card_serial for order in orders])
        known = _first_situations(ctx, orders)
        return [
            WorkResult(o.id, _step_written(ctx, o, _step(ctx, o, channel, bank, known.get(o.id))))
            for o in orders
        ]


def _lock_cards(ctx: Context, serials: list[str]) -> None:
    """The batch's cards, locked in serial order in one statement before any is looked at:
    two workers holding orders of one card decide one after the other (each then reads what
    the other committed), and two batches never wait for each other in a cycle."""
    if serials:
        ctx.session.scalars(_LOCK_CARDS, {"serials": sorted(set(serials))}).all()


def work_once(ctx: Context, channel: OtaChannel, bank: BankClient) -> WorkResult | None:
    """Do the next due step of one order (a sending step first, else a refund); None when
    nothing is due. Tests step the flow with it; the worker batches (``work_batch``)."""
    sent = work_batch(ctx, channel, bank, limit=1)
    return sent[0] if sent else refund_once(ctx, channel, bank)


def refund_once(ctx: Context, channel: OtaChannel, bank: BankClient) -> WorkResult | None:
    order = ctx.session.scalar(_DUE_TO_REFUND, {"now": ctx.now, "limit": 1})
    if order is None:
        return None
    return WorkResult(order.id, _step_written(ctx, order, _step(ctx, order, channel, bank)))


def _step_written(ctx: Context, order: TopUpOrder, outcome: str) -> str:
    """``outcome`` of the order's step, the step written (``write_now``) as it is decided."""
    write_now(ctx.session, order)
    return outcome


def _step(
    ctx: Context,
    order: TopUpOrder,
    channel: OtaChannel,
    bank: BankClient,
    situation: CardSituation | None = None,
) -> str:
    """The order's next step; ``situation``: its card's, read for the batch (else asked
    here)."""
    if order.state == "created":  # never paid in its lifetime
        order.state, order.finished_at, order.next_action_at = "failed", ctx.now, None
        order.failure = "not paid in time"
        return "expired"
    if order.state == "refunding":
        return _refund(ctx, order, channel, bank)
    rekeying, other_order_under_way, card_counter, card_status = situation or _card_situation(
        ctx, order
    )
    if rekeying:
        # The SIM's OTA keys are changing: a packet now might be under the wrong version.
        order.next_action_at = ctx.now + timedelta(seconds=rekey_wait_s)
        return "waiting for the SIM's rekey"
    if order.state in ("paid", "init_sent") and card_status != "active":
        # Safe, as below: no CREDIT can have happened yet. (A lost card's phone is not
        # trusted with a load, and its answers are not read.)
        to_refund(ctx, order, f"the card is {card_status}")
        return "giving up"
    if order.state == "paid" and other_order_under_way:
        if ctx.now > order.expires_at:
            to_refund(ctx, order, "another top-up of this card is still under way")
            return "giving up"
        order.next_action_at = ctx.now + timedelta(seconds=card_busy_wait_s)
        return "waiting for the card's other top-up"
    if order.state in ("paid", "init_sent"):
        return _send_packet_1(ctx, order, channel, card_counter)
    if order.state in CREDIT_MAY_HAVE_RUN:
        return _send_packet_3(ctx, order, channel, card_counter)
    raise AssertionError(f"no step from {order.state}")


def _refund(ctx: Context, order: TopUpOrder, channel: OtaChannel, bank: BankClient) -> str:
    """What the bank holds for the order goes back. When the bank cannot be asked, or says
    no, the order waits (it is asked again later) and the other refunds go on."""
    held_fen = order.paid_fen if order.paid_fen is not None else order.amount_fen
    refund_id = _refund_at_bank(
        ctx,
        bank,
        order.payment_id or "",
        held_fen,
        order.failure or "not loaded",
        f"topup:{order.reference}",
        order.reference,
    )
    if isinstance(refund_id, _NotNow):
        order.next_action_at = ctx.now + timedelta(seconds=refund_id.wait_s)
        return refund_id.outcome
    _post(
        ctx,
        TOPUP_PENDING,
        "platform",
        ledger.BANK_SETTLEMENT,
        BANK,
        held_fen,
        f"topup_refund:{order.id}",
    )
    order.state, order.finished_at, order.next_action_at = "refunded", ctx.now, None
    write_now(ctx.session, order)
    channel.notify(order.phone, f"充值未完成，已退款 Refunded {yuan(held_fen)}")
    audit.record(
        ctx.session,
        "worker",
        "topup.refunded",
        order.card_serial,
        ctx.now,
        order=order.reference,
        refund=refund_id,
    )
    return "refunded"


def _send_packet_1(ctx: Context, order: TopUpOrder, channel: OtaChannel, card_counter: int) -> str:
    if order.init_attempts >= init_attempts_max:
        # Safe: from here no CREDIT can have succeeded (a CREDIT without an answer goes to
        # proving, never back here unproven).
        to_refund(ctx, order, "the phone did not answer")
        return "giving up"
    order.init_attempts += 1
    request = InitializeRequest(LOAD_KEY_INDEX, order.amount_fen, OTA_TERMINAL_ID)
    with ctx.session.no_autoflush:  # the order is written once, with its new state
        channel.send(
            order.phone,
            order.card_serial,
            _next_step(order, card_counter),
            [select_by_aid(TRANSIT_AID).encode(), initialize_for_load(request).encode()],
        )
    _wait(ctx, order, "init_sent", por_timeout_s)
    return "packet 1 sent"


def _send_packet_3(ctx: Context, order: TopUpOrder, channel: OtaChannel, card_counter: int) -> str:
    prove = get_transaction_prove(TYPE_LOAD, (order.online_ctc or 0) + 1)
    with ctx.session.no_autoflush:
        channel.send(
            order.phone,
            order.card_serial,
            _next_step(order, card_counter),
            [select_by_aid(TRANSIT_AID).encode(), prove.encode()],
        )
    backoff = min(por_timeout_s * 2 ** max(order.attempts - 1, 0), prove_backoff_max_s)
    _wait(ctx, order, "proving", backoff)
    return "packet 3 sent"


def _last_counters(serial, other_than_order):  # type: ignore[no-untyped-def]
    """The highest packet counters this card has seen: from its other orders, and from
    its rekeys (their packets count counter_base, counter_base + 1, …)."""
    return (
        select(func.max(TopUpOrder.step))
        .where(TopUpOrder.card_serial == serial, TopUpOrder.id != other_than_order)
        .scalar_subquery(),
        select(func.max(OtaRekey.counter_base + OtaRekey.attempts - 1))
        .where(OtaRekey.card_serial == serial, OtaRekey.attempts > 0)
        .scalar_subquery(),
    )


def _card_situation_query():  # type: ignore[no-untyped-def]
    """Built once (the worker asks it for every packet 1: built per call, its expression
    tree and cache key were a fifth of the worker's CPU)."""
    serial, order_id = bindparam("serial", type_=String), bindparam("order_id", type_=Integer)
    other = aliased(TopUpOrder)
    return select(
        exists().where(OtaRekey.card_serial == serial, OtaRekey.state.in_(rekeys.SENDING)),
        exists().where(
            other.card_serial == serial,
            other.id != order_id,
            or_(
                other.state.in_(SENDING_PACKETS),
                and_(other.state == "paid", other.id < order_id),
            ),
        ),
        *_last_counters(serial, order_id),
        Card.status,
    ).where(Card.serial == serial)


_CARD_SITUATION = _card_situation_query()


CardSituation = tuple[bool, bool, int, str]  # rekeying, another order under way, counter, status


def _card_situation(ctx: Context, order: TopUpOrder) -> CardSituation:
    """What else goes on with this order's card, in one query (the card is locked by
    ``_lock_cards`` first, in a statement of its own: one that waited for a lock reads
    what was committed before it started): is a rekey sending; is another order under
    way — sending packets, or paid earlier and first in line (one load at a time, or the
    SIM would see INITIALIZE, INITIALIZE, CREDIT); and the highest packet counter the
    card has seen from anything but this order; and the card's status."""
    rekeying, other_order, from_orders, from_rekeys, status = ctx.session.execute(
        _CARD_SITUATION, {"serial": order.card_serial, "order_id": order.id}
    ).one()
    return bool(rekeying), bool(other_order), max(from_orders or 0, from_rekeys or 0), status


def _card_situations_query():  # type: ignore[no-untyped-def]
    """``_CARD_SITUATION`` for several cards at once, as figures per card that each order
    reads its own answer from (``_first_situations``). Built once."""
    serial = Card.serial

    def of_card_orders(column, *where):  # type: ignore[no-untyped-def]
        return select(column).where(TopUpOrder.card_serial == serial, *where).scalar_subquery()

    return select(
        serial,
        Card.status,
        exists().where(OtaRekey.card_serial == serial, OtaRekey.state.in_(rekeys.SENDING)),
        of_card_orders(func.count(), TopUpOrder.state.in_(SENDING_PACKETS)),
        of_card_orders(func.min(TopUpOrder.id), TopUpOrder.state.in_(SENDING_PACKETS)),
        of_card_orders(func.min(TopUpOrder.id), TopUpOrder.state == "paid"),
        of_card_orders(func.max(TopUpOrder.step)),
        select(func.max(OtaRekey.counter_base + OtaRekey.attempts - 1))
        .where(OtaRekey.card_serial == serial, OtaRekey.attempts > 0)
        .scalar_subquery(),
    ).where(serial.in_(bindparam("serials", expanding=True)))


_CARD_SITUATIONS = _card_situations_query()


def _first_situations(ctx: Context, orders: list[TopUpOrder]) -> dict[int, CardSituation]:
    """Order id → its card's situation, as ``_card_situation`` would answer it, for the
    first order of each card in a batch: in one query, not one an order. Only the first:
    nothing in the batch has touched its card before its step, while a later order of the
    same card must see what the earlier one's step wrote (it asks its own query). The
    counter is the highest step of all the card's orders, this one's too: ``_next_step``
    takes this order's own step into account anyway."""
    first = {}
    for order in orders:
        first.setdefault(order.card_serial, order)
    if len(first) < 2:
        return {}  # (one card: its own query costs the same)
    known = {}
    rows = ctx.session.execute(_CARD_SITUATIONS, {"serials": sorted(first)})
    for serial, status, rekeying, sending, first_sending, first_paid, step, rekey_step in rows:
        order = first[serial]
        another_sending = sending > 1 or (sending == 1 and first_sending != order.id)
        paid_before = first_paid is not None and first_paid < order.id
        counter = max(step or 0, rekey_step or 0)
        known[order.id] = (bool(rekeying), another_sending or paid_before, counter, status)
    return known


def last_packet_counter(ctx: Context, serial: str) -> int:
    """The highest packet counter this card has seen (a rekey starts above it)."""
    from_orders, from_rekeys = ctx.session.execute(select(*_last_counters(serial, -1))).one()
    return max(from_orders or 0, from_rekeys or 0)


def _next_step(order: TopUpOrder, card_counter: int) -> int:
    """The next packet's counter, one above every packet this card has seen (the SIM
    wants them ever higher, per keyset: here per card, whatever the TAR)."""
    order.attempts += 1
    order.step = max(order.step or 0, card_counter) + 1
    return order.step


def _wait(ctx: Context, order: TopUpOrder, state: str, seconds: int) -> None:
    order.state, order.next_action_at = state, ctx.now + timedelta(seconds=seconds)


def settle_unproven(ctx: Context, card_serial: str, reference: str, reason: str) -> TopUpOrder:
    """An operator's way out of a load that can no longer be proven: its CREDIT went to a
    SIM since reported lost, which has not answered. The order is refunded as any other,
    and the card can then be re-issued or closed — only once nothing the SIM may hold can
    be spent or has been (``_why_not_settled``). Should the lost SIM answer after all,
    its proof is stale (the order no longer sends packets), and audited."""
    ctx.principal.require("admin")
    reason = reason.strip()
    if not reason:
        raise InvalidInput("say why the load is settled unproven")
    card = cards.card_by_serial(ctx, card_serial, lock=True)  # (card, then order: as close
    # does; the worker locks the other way round, a deadlock retried by Database.run)
    order = ctx.session.scalars(
        select(TopUpOrder)
        .where(TopUpOrder.reference == reference.upper(), TopUpOrder.card_serial == card.serial)
        .with_for_update()
    ).one_or_none()
    if order is None:
        raise NotFound(f"no top-up {reference} of card {card.serial}")
    if order.state not in CREDIT_MAY_HAVE_RUN:
        raise Conflict(f"top-up {order.reference} is {order.state}: nothing unproven to settle")
    refusal = _why_not_settled(ctx, card, order)
    if refusal is not None:
        raise Conflict(refusal)
    to_refund(ctx, order, SETTLED_UNPROVEN)
    audit.record(
        ctx.session,
        ctx.principal.name,
        "topup.settled_unproven",
        card.serial,
        ctx.now,
        order=order.reference,
        reason=reason[:200],
    )
    return order


SETTLED_UNPROVEN = "unproven load of a card reported lost"  # (the refund's reason)


def _why_not_settled(ctx: Context, card: Card, order: TopUpOrder) -> str | None:
    """Why the load may still be on a SIM that can spend it, or has been spent; None when
    the card has been on the hot list for ``unproven_settle_wait_s``, every POS has taken
    that list and uploaded all its records since — all but those retired before the order
    was made — and none shows the card used after the order was made (a fare after the
    CREDIT may have spent the load: its records would tell, not a refund)."""
    if card.status != "lost":
        return f"card {card.serial} is {card.status}, not reported lost"
    listed = ctx.session.scalars(
        select(BlacklistChange)
        .where(BlacklistChange.card_serial == card.serial)
        .order_by(BlacklistChange.version.desc())
        .limit(1)
    ).first()
    if listed is None or listed.action != "add":
        return f"card {card.serial} is not on the hot list"
    settle_from = listed.created_at + timedelta(seconds=unproven_settle_wait_s)
    if ctx.now < settle_from:
        return (
            f"card {card.serial} is on the hot list since {listed.created_at}: its unproven "
            f"load can be settled from {settle_from}"
        )
    behind = ctx.session.scalars(
        select(PosDevice.terminal_id)
        .where(
            or_(PosDevice.retired_at.is_(None), PosDevice.retired_at >= order.created_at),
            or_(
                PosDevice.last_heartbeat_at.is_(None),
                PosDevice.last_heartbeat_at < listed.created_at,
                PosDevice.blacklist_version.is_(None),
                PosDevice.blacklist_version < listed.version,
                PosDevice.records_pending.is_(None),
                PosDevice.records_pending > 0,
            ),
        )
        .order_by(PosDevice.terminal_id)
        .limit(5)
    ).all()
    if behind:
        return (
            f"POS {', '.join(behind)} have not told since the loss that they hold the hot "
            "list and no record left to upload: the card may have been used there (a POS "
            "retired before this order was made is not waited for)"
        )
    used_at = ctx.session.scalar(
        select(func.min(TapRecord.occurred_at)).where(
            TapRecord.card_serial == card.serial, TapRecord.occurred_at >= order.created_at
        )
    )
    if used_at is not None:
        return f"card {card.serial} paid a fare at {used_at}, after this top-up was made"
    return None


def to_refund(ctx: Context, order: TopUpOrder, reason: str) -> None:
    order.state, order.failure, order.next_action_at = "refunding", reason[:80], ctx.now
    write_now(ctx.session, order)
    audit.record(
        ctx.session,
        "worker",
        "topup.to_refund",
        order.card_serial,
        ctx.now,
        order=order.reference,
        reason=reason,
    )


# --- proofs of receipt ---------------------------------------------------------------------


_ORDER_AT_STEP = (
    select(TopUpOrder)
    .where(
        TopUpOrder.card_serial == bindparam("serial", type_=String),
        TopUpOrder.step == bindparam("step", type_=BigInteger),  # its latest packet only
        TopUpOrder.state.in_(SENDING_PACKETS),
    )
    .with_for_update()
)


_LOCK_SENDING_ORDERS = (  # in id order, as every batch that locks orders
    select(TopUpOrder)
    .where(
        TopUpOrder.card_serial.in_(bindparam("serials", expanding=True)),
        TopUpOrder.state.in_(SENDING_PACKETS),
    )
    .order_by(TopUpOrder.id)
    .with_for_update()
)
# In Session.info: card serial → its orders sending packets, locked by ``ready_for_proofs``.
_SENDING_BY_CARD = "orders_sending_by_card"


def ready_for_proofs(ctx: Context, card_serials: set[str]) -> None:
    """Ahead of a batch of proofs of receipt from these cards: the orders they may answer
    (those sending packets) locked in one statement, and the accounts a load of these cards
    posts to read in one query — not one of each per proof. Until the transaction or a
    savepoint ends, ``on_proof_of_receipt`` finds these cards' orders among them."""
    serials = sorted(card_serials)
    sending = transaction_cache(ctx.session, _SENDING_BY_CARD, dict, savepoints=True)
    sending.update((serial, []) for serial in serials)
    for order in ctx.session.scalars(_LOCK_SENDING_ORDERS, {"serials": serials}):
        sending[order.card_serial].append(order)
    ledger.read_account_ids(
        ctx.session,
        (TOPUP_PENDING, "platform"),
        *((ledger.CARD_FLOAT, serial) for serial in serials),
    )


def _order_at_step(ctx: Context, card_serial: str, step: int) -> TopUpOrder | None:
    """The order whose latest packet is ``step``, if it is still sending packets: locked,
    by ``ready_for_proofs`` or here. (A card sends one order's packets at a time: an order
    that stops sending meanwhile, in this transaction, is seen as the query would see it.)"""
    locked = ctx.session.info.get(_SENDING_BY_CARD, {}).get(card_serial)
    if locked is None:
        return ctx.session.scalar(_ORDER_AT_STEP, {"serial": card_serial, "step": step})
    return next((o for o in locked if o.step == step and o.state in SENDING_PACKETS), None)


def on_proof_of_receipt(
    ctx: Context,
    channel: OtaChannel,
    card_serial: str,
    step: int,
    last_response: bytes,
) -> str:
    """The SIM answered packet ``step``: ``last_response`` is the last command's data ‖ SW.
    A card reported lost gets no CREDIT; a load it may already have done is still
    settled."""
    order = _order_at_step(ctx, card_serial.upper(), step)
    if order is None or len(last_response) < 2:
        _audit_a_proof_after_settlement(ctx, card_serial.upper(), step, last_response)
        return "stale"
    outcome = _answered(ctx, channel, order, last_response)
    write_now(ctx.session, order)
    if order.state == "paid":  # again from packet 1, now: a step for the due loop
        bank_webhooks.wake_workers(ctx.session)
    return outcome


_SETTLED_AT_STEP = select(TopUpOrder).where(
    TopUpOrder.card_serial == bindparam("serial", type_=String),
    TopUpOrder.step == bindparam("step", type_=BigInteger),
    TopUpOrder.failure == SETTLED_UNPROVEN,
)


def _audit_a_proof_after_settlement(
    ctx: Context, card_serial: str, step: int, last_response: bytes
) -> None:
    """A lost SIM proving, after all, a load an operator settled unproven (refunded): the
    SIM holds that money, which nothing pays for. Nothing moves — the card is hot-listed —
    but it is put on record for a person to look at. (Only a lost card's proofs are looked
    at: a settled load's card is lost, and an active card's stale proofs cost no query.)"""
    card = cards.find_card(ctx.session, card_serial)  # (loaded for the proof: no query)
    if card is None or card.status != "lost" or last_response[-2:] != b"\x90\x00":
        return
    settled = ctx.session.scalar(_SETTLED_AT_STEP, {"serial": card_serial, "step": step})
    if settled is None:
        return
    data = last_response[:-2]
    try:
        tac = data if len(data) == 4 else TransactionProof.decode(data).tac
    except ValueError:
        return
    if _tac_ok(ctx, settled, tac):
        audit.record(
            ctx.session,
            "worker",
            "topup.proved_after_settlement",
            card_serial,
            ctx.now,
            order=settled.reference,
            amount_fen=settled.amount_fen,
            tac=tac.hex().upper(),
        )


def _answered(
    ctx: Context,
    channel: OtaChannel,
    order: TopUpOrder,
    last_response: bytes,
) -> str:
    data, sw = last_response[:-2], int.from_bytes(last_response[-2:], "big")
    if order.state == "init_sent":
        card = cards.find_card(ctx.session, order.card_serial)  # (loaded: no query)
        if card is None or card.status != "active":  # safe: no CREDIT went to it yet
            to_refund(ctx, order, "the card is lost")
            return "card lost: refunding"
        return _initialized(ctx, order, channel, data, sw)
    if order.state == "credit_sent":
        if sw == 0x9000 and _tac_ok(ctx, order, data):
            return _loaded(ctx, channel, order, data)
        order.state, order.next_action_at = "paid", ctx.now  # CREDIT refused: not loaded
        return "credit refused: again from packet 1"
    if order.state == "proving":
        if sw == 0x6985:
            order.state, order.next_action_at = "paid", ctx.now
            return "not loaded: again from packet 1"
        if sw == 0x9000:
            tac = TransactionProof.decode(data).tac
            if _tac_ok(ctx, order, tac):
                return _loaded(ctx, channel, order, tac)
    return "ignored"


def _initialized(ctx: Context, order: TopUpOrder, channel: OtaChannel, data: bytes, sw: int) -> str:
    if sw != 0x9000:
        to_refund(ctx, order, f"card refused INITIALIZE FOR LOAD: {sw:04X}")
        return "refused"
    try:
        card = InitializeForLoadResponse.decode(data)
    except ValueError:
        return "ignored: not an INITIALIZE FOR LOAD answer"
    try:
        authorization = authorize_load(
            ctx.keys.issuer_keys(),
            bytes.fromhex(order.card_serial),
            order.amount_fen,
            OTA_TERMINAL_ID,
            card,
        )
    except Mac1Invalid:
        audit.record(
            ctx.session,
            "worker",
            "topup.mac1_invalid",
            order.card_serial,
            ctx.now,
            order=order.reference,
        )
        to_refund(ctx, order, "MAC1 invalid: wrong or cloned card")
        return "mac1 invalid"
    date_bcd, time_bcd = bcd_date(ctx.now), bcd_time(ctx.now)
    order.online_ctc, order.old_balance_fen = card.online_ctc, card.old_balance
    order.card_random, order.key_version = card.random.hex(), card.key_version
    order.algorithm, order.date_bcd, order.time_bcd = (
        int(card.algorithm),
        date_bcd.hex(),
        time_bcd.hex(),
    )
    credit = CreditForLoadRequest(date_bcd, time_bcd, authorization.mac2(date_bcd, time_bcd))
    step = _next_step(order, 0)  # one above packet 1's: nothing else went to the card since
    with ctx.session.no_autoflush:
        channel.send(order.phone, order.card_serial, step, [credit.command().encode()])
    _wait(ctx, order, "credit_sent", por_timeout_s)
    return "packet 2 sent"


def _tac_ok(ctx: Context, order: TopUpOrder, tac: bytes) -> bool:
    card = InitializeForLoadResponse(
        order.old_balance_fen or 0,
        order.online_ctc or 0,
        order.key_version or 0,
        Algorithm(order.algorithm or 0),
        bytes.fromhex(order.card_random or "00000000"),
        b"\x00" * 4,
    )
    authorization = LoadAuthorization(
        bytes.fromhex(order.card_serial), order.amount_fen, OTA_TERMINAL_ID, card, b""
    )
    expected = authorization.expected_tac(
        ctx.keys.issuer_keys(),
        bytes.fromhex(order.date_bcd or ""),
        bytes.fromhex(order.time_bcd or ""),
    )
    return len(tac) == 4 and hmac.compare_digest(expected, tac)


def _loaded(ctx: Context, channel: OtaChannel, order: TopUpOrder, tac: bytes) -> str:
    _post(
        ctx,
        TOPUP_PENDING,
        "platform",
        ledger.CARD_FLOAT,
        order.card_serial,
        order.amount_fen,
        f"topup_loaded:{order.id}",
    )
    order.state, order.tac, order.finished_at = "loaded", tac.hex().upper(), ctx.now
    order.next_action_at = None
    write_now(ctx.session, order)
    audit.record(
        ctx.session,
        "worker",
        "topup.loaded",
        order.card_serial,
        ctx.now,
        order=order.reference,
        amount_fen=order.amount_fen,
    )
    balance = (order.old_balance_fen or 0) + order.amount_fen
    channel.notify(
        order.phone, f"充值成功 Top-up OK {yuan(order.amount_fen)}, 余额 balance {yuan(balance)}"
    )
    return "loaded"


def payment_link(order: TopUpOrder, merchant: str) -> str:
    """What the order SMS carries: the passenger's bank app pays from it."""
    return f"buspay://{merchant}/{order.reference}/{order.amount_fen}"


def order_notice(order: TopUpOrder, merchant: str) -> str:
    return f"请付款 Pay {yuan(order.amount_fen)}: {payment_link(order, merchant)}"
