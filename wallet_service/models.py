"""The platform's tables (SQLAlchemy 2.0 typed models). Money is integer fen.

Ledger: ``Account`` keeps its posted debits and credits; ``Transfer`` rows are immutable,
each one debit and one credit of the same amount, so the books balance by construction and
``ledger.check_balanced`` verifies it. Everything else is the bus company's registry, the
cards, the POS records and the audit trail.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import false, text

from wallet_service.db import Base

Fen = BigInteger


class Operator(Base):
    """A bus company."""

    __tablename__ = "operators"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    fee_rate_bp: Mapped[int] = mapped_column(Integer, default=0)  # platform fee, basis points


class Fleet(Base):
    __tablename__ = "fleets"
    __table_args__ = (UniqueConstraint("operator_id", "code"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    code: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100))


class Route(Base):
    __tablename__ = "routes"
    __table_args__ = (UniqueConstraint("operator_id", "code"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    code: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100))
    fare_fen: Mapped[int] = mapped_column(Fen)  # flat fare


class Vehicle(Base):
    __tablename__ = "vehicles"
    __table_args__ = (UniqueConstraint("operator_id", "code"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    route_id: Mapped[int | None] = mapped_column(ForeignKey("routes.id"))
    code: Mapped[str] = mapped_column(String(16))
    plate: Mapped[str] = mapped_column(String(16))


class Driver(Base):
    __tablename__ = "drivers"
    __table_args__ = (UniqueConstraint("operator_id", "code"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    code: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(24))


class DriverCard(Base):
    __tablename__ = "driver_cards"
    id: Mapped[int] = mapped_column(primary_key=True)
    driver_id: Mapped[int] = mapped_column(ForeignKey("drivers.id"))
    serial: Mapped[str] = mapped_column(String(20), unique=True)
    expiry: Mapped[date] = mapped_column(Date)
    issued_at: Mapped[datetime] = mapped_column(DateTime)
    image_file: Mapped[str] = mapped_column(String(200))


class PosDevice(Base):
    __tablename__ = "pos_devices"
    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    vehicle_id: Mapped[int] = mapped_column(ForeignKey("vehicles.id"))
    terminal_id: Mapped[str] = mapped_column(String(12), unique=True)
    psam_key_version: Mapped[int] = mapped_column(Integer, default=1)
    firmware: Mapped[str | None] = mapped_column(String(32))
    blacklist_version: Mapped[int | None] = mapped_column(BigInteger)
    records_pending: Mapped[int | None] = mapped_column(Integer)
    last_upload_at: Mapped[datetime | None] = mapped_column(DateTime)
    psam_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime)  # out of service: no token


class BusinessHall(Base):
    """An operator business hall or an agent: where counter top-ups happen."""

    __tablename__ = "business_halls"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(8))  # hall | agent
    daily_limit_fen: Mapped[int] = mapped_column(Fen)


class Card(Base):
    """A mobile bus card: the transit application on one SIM."""

    __tablename__ = "cards"
    __table_args__ = (
        # A phone holds one SIM: its SMS (requests, PoRs) name one card. Cards of the past
        # (lost, replaced, closed) keep the number.
        Index(
            "cards_one_active_per_phone",
            "phone",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    serial: Mapped[str] = mapped_column(String(20), unique=True)
    iccid: Mapped[str] = mapped_column(String(20), unique=True)
    phone: Mapped[str] = mapped_column(String(20))
    algorithm: Mapped[str] = mapped_column(String(4))
    status: Mapped[str] = mapped_column(String(12))  # issued active lost replaced closed
    holder_name: Mapped[str | None] = mapped_column(String(40))
    holder_id_type: Mapped[str | None] = mapped_column(String(12))
    holder_id_number: Mapped[str | None] = mapped_column(String(32))
    issued_at: Mapped[datetime] = mapped_column(DateTime)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime)
    replaced_by_id: Mapped[int | None] = mapped_column(ForeignKey("cards.id"))
    image_file: Mapped[str] = mapped_column(String(200))
    ota_key_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("debits_fen >= 0 AND credits_fen >= 0", name="posted_not_negative"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(24))
    debits_fen: Mapped[int] = mapped_column(Fen, default=0)
    credits_fen: Mapped[int] = mapped_column(Fen, default=0)


class Transfer(Base):
    __tablename__ = "transfers"
    __table_args__ = (CheckConstraint("amount_fen > 0", name="amount_positive"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    debit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    credit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount_fen: Mapped[int] = mapped_column(Fen)
    kind: Mapped[str] = mapped_column(String(24))
    reference: Mapped[str] = mapped_column(String(64), unique=True)  # posts at most once
    created_at: Mapped[datetime] = mapped_column(DateTime)


class CounterLoad(Base):
    """A counter top-up: pending after MAC1, loaded after the TAC, or failed."""

    __tablename__ = "counter_loads"
    __table_args__ = (
        CheckConstraint("amount_fen > 0", name="load_amount_positive"),
        Index("counter_loads_by_hall_day", "hall_id", "business_date"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("cards.id"), index=True)
    hall_id: Mapped[int] = mapped_column(ForeignKey("business_halls.id"))
    amount_fen: Mapped[int] = mapped_column(Fen)
    terminal_id: Mapped[str] = mapped_column(String(12))
    old_balance_fen: Mapped[int] = mapped_column(Fen)
    online_ctc: Mapped[int] = mapped_column(Integer)
    card_random: Mapped[str] = mapped_column(String(8))
    key_version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[int] = mapped_column(Integer)
    date_bcd: Mapped[str] = mapped_column(String(8))
    time_bcd: Mapped[str] = mapped_column(String(6))
    state: Mapped[str] = mapped_column(String(8))  # pending loaded failed
    tac: Mapped[str | None] = mapped_column(String(8))
    business_date: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime)


class TapRecord(Base):
    """A fare as a POS uploaded it. (terminal id, terminal seq) is its identity."""

    __tablename__ = "tap_records"
    __table_args__ = (
        UniqueConstraint("terminal_id", "terminal_seq", name="one_record_per_seq"),
        Index("tap_records_by_card", "card_serial", "ctc"),
        Index("tap_records_by_operator", "operator_id", "id"),  # (pages and downloads)
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(12))
    terminal_seq: Mapped[int] = mapped_column(BigInteger)
    device_id: Mapped[int] = mapped_column(ForeignKey("pos_devices.id"))
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    card_serial: Mapped[str] = mapped_column(String(20))
    ctc: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(Fen)
    balance_before_fen: Mapped[int] = mapped_column(Fen)
    balance_after_fen: Mapped[int] = mapped_column(Fen)
    transaction_type: Mapped[int] = mapped_column(Integer)
    occurred_at: Mapped[datetime] = mapped_column(DateTime)
    tac: Mapped[str] = mapped_column(String(8))
    mac2: Mapped[str] = mapped_column(String(8))
    mac2_verified: Mapped[bool] = mapped_column(Boolean)
    key_version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(16))
    vehicle: Mapped[str] = mapped_column(String(16))
    driver: Mapped[str] = mapped_column(String(10))
    recovered: Mapped[bool] = mapped_column(Boolean)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    clearing_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("clearing_runs.id", name="tap_records_clearing_run_fk"), index=True
    )
    # bad TAC or duplicate: not paid
    excluded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RecordConflict(Base):
    """An upload that claimed an existing (terminal, seq) with different content."""

    __tablename__ = "record_conflicts"
    id: Mapped[int] = mapped_column(primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(12))
    terminal_seq: Mapped[int] = mapped_column(BigInteger)
    submitted: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime)


class BlacklistChange(Base):
    """Hot list, versioned: each change gets the next version."""

    __tablename__ = "blacklist_changes"
    version: Mapped[int] = mapped_column(primary_key=True)
    card_serial: Mapped[str] = mapped_column(String(20), index=True)
    action: Mapped[str] = mapped_column(String(6))  # add | remove
    reason: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(12))  # admin counter staff pos
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id"))
    hall_id: Mapped[int | None] = mapped_column(ForeignKey("business_halls.id"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("pos_devices.id"))
    label: Mapped[str] = mapped_column(String(60))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("principal", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    principal: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(String(60))
    action: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(60))
    details: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ClearingRun(Base):
    """One clearing of a business day; the records it claimed carry its id."""

    __tablename__ = "clearing_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    business_date: Mapped[date] = mapped_column(Date, index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    records: Mapped[int] = mapped_column(BigInteger, default=0)
    paid_records: Mapped[int] = mapped_column(BigInteger, default=0)
    paid_fen: Mapped[int] = mapped_column(Fen, default=0)


class ClearingException(Base):
    """What clearing found: bad TAC (not paid, suspected fraud), duplicate (not paid), CTC gap
    or balance-chain break (paid, reported)."""

    __tablename__ = "clearing_exceptions"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("clearing_runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    card_serial: Mapped[str] = mapped_column(String(20), index=True)
    record_id: Mapped[int | None] = mapped_column(BigInteger)
    terminal_id: Mapped[str | None] = mapped_column(String(12))
    details: Mapped[str] = mapped_column(Text)


class CardClearingState(Base):
    """Where each card's chain stood after the last clearing: continuity across days."""

    __tablename__ = "card_clearing_states"
    card_serial: Mapped[str] = mapped_column(String(20), primary_key=True)
    last_ctc: Mapped[int] = mapped_column(Integer)
    last_balance_after_fen: Mapped[int] = mapped_column(Fen)
    last_event_at: Mapped[datetime] = mapped_column(DateTime)
    last_terminal_id: Mapped[str] = mapped_column(String(12))


class ClearingTotal(Base):
    """Counts and amounts of paid records by operator, fleet, route, vehicle and driver."""

    __tablename__ = "clearing_totals"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("clearing_runs.id"), index=True)
    business_date: Mapped[date] = mapped_column(Date, index=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    fleet: Mapped[str] = mapped_column(String(16))
    route: Mapped[str] = mapped_column(String(16))
    vehicle: Mapped[str] = mapped_column(String(16))
    driver: Mapped[str] = mapped_column(String(10))
    adjustment: Mapped[bool] = mapped_column(Boolean)  # records of earlier days, cleared late
    records: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(Fen)


class SettlementStatement(Base):
    """What the platform owes a bus company for one clearing run, net of its fee."""

    __tablename__ = "settlement_statements"
    __table_args__ = (UniqueConstraint("run_id", "operator_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("clearing_runs.id"))
    business_date: Mapped[date] = mapped_column(Date, index=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    records: Mapped[int] = mapped_column(BigInteger)
    gross_fen: Mapped[int] = mapped_column(Fen)
    adjustments_fen: Mapped[int] = mapped_column(Fen)
    fee_rate_bp: Mapped[int] = mapped_column(Integer)
    fee_fen: Mapped[int] = mapped_column(Fen)
    net_fen: Mapped[int] = mapped_column(Fen)


class BankWebhookEvent(Base):
    """A bank callback, stored (deduplicated by its webhook-id) before it is acknowledged."""

    __tablename__ = "bank_webhook_events"
    __table_args__ = (
        # The worker looks for both on every pass; the table only grows.
        Index(
            "bank_webhook_events_unprocessed",
            "received_at",
            sqlite_where=text("processed_at IS NULL"),
            postgresql_where=text("processed_at IS NULL"),
        ),
        Index(
            "bank_webhook_events_refund_due",
            "refund_due_at",
            sqlite_where=text("refund_due_at IS NOT NULL"),
            postgresql_where=text("refund_due_at IS NOT NULL"),
        ),
    )
    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # webhook-id
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # A payment for an order the platform never made: its refund is due from then (a step
    # of its own, so no callback waits for the bank).
    refund_due_at: Mapped[datetime | None] = mapped_column(DateTime)


class TopUpOrder(Base):
    """An over-the-air top-up, from the passenger's request to the card's TAC (or a refund).

    States: created → paid → init_sent → credit_sent → loaded; proving (a CREDIT without an
    answer: GET TRANSACTION PROVE asked); refunding → refunded; failed (never paid)."""

    __tablename__ = "topup_orders"
    __table_args__ = (
        UniqueConstraint("card_serial", "request_id", name="one_order_per_request"),
        CheckConstraint("amount_fen > 0", name="topup_amount_positive"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str] = mapped_column(String(40), unique=True)  # the bank's order id
    card_serial: Mapped[str] = mapped_column(String(20), index=True)
    request_id: Mapped[str] = mapped_column(String(8))
    phone: Mapped[str] = mapped_column(String(20))
    amount_fen: Mapped[int] = mapped_column(Fen)  # what the passenger asked for
    paid_fen: Mapped[int | None] = mapped_column(Fen)  # what the bank says it paid
    paid_at: Mapped[datetime | None] = mapped_column(DateTime)  # when, by the bank's clock
    state: Mapped[str] = mapped_column(String(12), index=True)
    payment_id: Mapped[str | None] = mapped_column(String(40))
    online_ctc: Mapped[int | None] = mapped_column(Integer)
    old_balance_fen: Mapped[int | None] = mapped_column(Fen)
    card_random: Mapped[str | None] = mapped_column(String(8))
    key_version: Mapped[int | None] = mapped_column(Integer)
    algorithm: Mapped[int | None] = mapped_column(Integer)
    date_bcd: Mapped[str | None] = mapped_column(String(8))
    time_bcd: Mapped[str | None] = mapped_column(String(6))
    tac: Mapped[str | None] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # packets sent
    step: Mapped[int | None] = mapped_column(BigInteger)  # the latest packet's counter
    init_attempts: Mapped[int] = mapped_column(Integer, default=0)  # packet 1 sends
    next_action_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    failure: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class OtaRekey(Base):
    """Replacing a SIM's OTA keyset over the air (PUT KEY to the SIM's security domain).

    States: waiting (no top-up in flight yet) → put_key_sent ⇄ probing (asking under the
    new keys whether the SIM switched) → done (the card's key version moves) | failed."""

    __tablename__ = "ota_rekeys"
    id: Mapped[int] = mapped_column(primary_key=True)
    card_serial: Mapped[str] = mapped_column(String(20), index=True)
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    counter_base: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_action_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
