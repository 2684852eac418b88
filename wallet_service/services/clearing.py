"""Clearing and settlement of a business day (clearing issue §1).

    claim      every uncleared record up to the day's end takes this run's id (set-based);
               records of earlier days are adjustments, shown as such
    verify     records stream ordered by (card, CTC) through a server-side cursor, merged
               with each card's stored chain state and its loads — bounded memory:
               · the TAC, recomputed with the issuer's TAC key: a bad one is not paid and is
                 reported as suspected fraud with the device that sent it
               · a second record of one (card, CTC): a duplicate, not paid
               · CTC continuity: a gap lists the missing CTCs and the last device that saw
                 the card; balance chain: balance before = the previous balance after,
                 loads between included. Both are reported and paid; a card with
                 ``anomalies_to_hotlist`` of them goes on the hot list
    aggregate  counts and amounts by operator, fleet, route, vehicle, driver (SQL)
    settle     card float → operator payable per (card, operator); operator payable → fees
               at the contract rate; a statement per operator. Transfer references are
               unique, so nothing posts twice.

Re-running a day claims nothing new and posts nothing: its report stays the same.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select, text, update
from sqlalchemy.orm import Session

from sim_applet.crypto import Algorithm
from sim_applet.issuer import TacVerifier
from sim_applet.personalize import IssuerKeys
from wallet_service import ledger
from wallet_service.models import (
    BlacklistChange,
    Card,
    CardClearingState,
    ClearingException,
    ClearingRun,
    ClearingTotal,
    CounterLoad,
    Fleet,
    Operator,
    SettlementStatement,
    TapRecord,
    Vehicle,
)
from wallet_service.services.cards import blacklist
from wallet_service.services.registry import Context

stream_batch_records = 5_000
exceptions_batch_max = 1_000
anomalies_to_hotlist = 3
loads_lookback_days = 31

BAD_TAC, DUPLICATE, CTC_GAP, BALANCE_BREAK = "bad_tac", "duplicate", "ctc_gap", "balance_break"
NOT_PAID = (BAD_TAC, DUPLICATE)


@dataclass
class RunReport:
    run_id: int
    business_date: date
    records: int
    paid_records: int
    paid_fen: int
    exceptions: dict[str, int] = field(default_factory=dict)
    hot_listed: list[str] = field(default_factory=list)


@dataclass
class _Chain:
    """A card's chain while its records stream by."""

    serial: str
    last_ctc: int | None
    balance_after: int | None
    last_terminal: str | None
    last_event_at: datetime | None


def _without_statement_limit(session: Session) -> None:
    """A day is cleared in one transaction whose statements each go over the whole day's
    records (after an outage, several days'): all or nothing, so one cancelled by the
    connection's statement limit (``db.SessionLimits``) would be cancelled again at every
    retry, and the day never cleared. No limit for this transaction (PostgreSQL, as SET
    LOCAL), but on its waits for locks, which keep the statement limit's bound (another
    run of the day, a hung one, holds them: asking again later may do); the idle-in-
    transaction limit stays too: between its statements it only computes."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT set_config('lock_timeout', current_setting('statement_timeout'), true)")
        )
        session.execute(text("SET LOCAL statement_timeout = 0"))


def run(ctx: Context, business_date: date) -> RunReport:
    ctx.principal.require("admin")
    session = ctx.session
    _without_statement_limit(session)
    end = datetime.combine(business_date + timedelta(days=1), time())
    clearing_run = ClearingRun(business_date=business_date, started_at=ctx.now)
    session.add(clearing_run)
    session.flush()
    claimed = session.execute(
        update(TapRecord)
        .where(TapRecord.clearing_run_id.is_(None), TapRecord.occurred_at < end)
        .values(clearing_run_id=clearing_run.id)
        .execution_options(synchronize_session=False)
    ).rowcount
    report = RunReport(clearing_run.id, business_date, claimed, 0, 0)
    if claimed:
        _verify(session, ctx.keys.issuer_keys(), clearing_run.id, end, report)
        _aggregate(session, clearing_run.id, business_date)
        _settle(session, clearing_run.id, business_date, ctx.now)
        report.hot_listed = _hot_list(ctx, clearing_run.id)
    paid = session.execute(
        select(func.count(), func.coalesce(func.sum(TapRecord.amount_fen), 0)).where(
            TapRecord.clearing_run_id == clearing_run.id, TapRecord.excluded.is_(False)
        )
    ).one()
    report.paid_records, report.paid_fen = int(paid[0]), int(paid[1])
    clearing_run.records, clearing_run.paid_records = claimed, report.paid_records
    clearing_run.paid_fen, clearing_run.finished_at = report.paid_fen, ctx.now
    return report


# --- verify --------------------------------------------------------------------------------


_RECORD_COLUMNS = (
    TapRecord.id,
    TapRecord.card_serial,
    TapRecord.ctc,
    TapRecord.terminal_id,
    TapRecord.terminal_seq,
    TapRecord.amount_fen,
    TapRecord.transaction_type,
    TapRecord.occurred_at,
    TapRecord.tac,
    TapRecord.algorithm,
    TapRecord.balance_before_fen,
    TapRecord.balance_after_fen,
    TapRecord.clearing_run_id,
)


def _stream_records(session: Session, run_id: int) -> Iterator[Any]:
    """Rows, not ORM objects: a million entities would cost more than the cryptography."""
    query = (
        select(*_RECORD_COLUMNS)
        .where(TapRecord.clearing_run_id == run_id)
        .order_by(TapRecord.card_serial, TapRecord.ctc, TapRecord.received_at, TapRecord.id)
        .execution_options(yield_per=stream_batch_records)
    )
    yield from session.execute(query)


def _stream_states(session: Session, first: str) -> Iterator[Any]:
    query = (
        select(CardClearingState.__table__)
        .where(CardClearingState.card_serial >= first)
        .order_by(CardClearingState.card_serial)
        .execution_options(yield_per=stream_batch_records)
    )
    yield from session.execute(query)


def _stream_loads(session: Session, end: datetime) -> Iterator[tuple[str, datetime, int, int]]:
    query = (
        select(
            Card.serial, CounterLoad.created_at, CounterLoad.old_balance_fen, CounterLoad.amount_fen
        )
        .join(Card, Card.id == CounterLoad.card_id)
        .where(
            CounterLoad.state == "loaded",
            CounterLoad.created_at < end,
            CounterLoad.created_at >= end - timedelta(days=loads_lookback_days),
        )
        .order_by(Card.serial, CounterLoad.created_at)
        .execution_options(yield_per=stream_batch_records)
    )
    yield from session.execute(query)


class _Merge:
    """Advance an ordered stream to a key: the merge-join that keeps memory bounded."""

    def __init__(self, stream: Iterator[Any], key) -> None:  # type: ignore[no-untyped-def]
        self.stream, self.key = stream, key
        self.head = next(stream, None)

    def take(self, serial: str) -> list[Any]:
        while self.head is not None and self.key(self.head) < serial:
            self.head = next(self.stream, None)
        taken = []
        while self.head is not None and self.key(self.head) == serial:
            taken.append(self.head)
            self.head = next(self.stream, None)
        return taken


def _verify(
    session: Session, issuer: IssuerKeys, run_id: int, end: datetime, report: RunReport
) -> None:
    """All streams run on the run's own session: they see its claim, and the whole run
    stays one transaction (a crash clears nothing). On PostgreSQL each stream is a
    server-side cursor, fetched ``stream_batch_records`` at a time."""
    records = _stream_records(session, run_id)
    first = next(records, None)
    if first is None:
        return
    states = _Merge(_stream_states(session, first.card_serial), lambda s: s.card_serial)
    loads = _Merge(_stream_loads(session, end), lambda row: row[0])
    writer = _Writer(session, run_id, report)
    group: list[TapRecord] = [first]
    for record in records:
        if record.card_serial != group[0].card_serial:
            _verify_card(session, issuer, group, states, loads, writer)
            group = []
        group.append(record)
    _verify_card(session, issuer, group, states, loads, writer)
    writer.flush()


def _verify_card(
    session: Session,
    issuer: IssuerKeys,
    records: list[TapRecord],
    states: _Merge,
    loads: _Merge,
    writer: _Writer,
) -> None:
    serial = records[0].card_serial
    stored = states.take(serial)
    chain = (
        _Chain(
            serial,
            stored[0].last_ctc,
            stored[0].last_balance_after_fen,
            stored[0].last_terminal_id,
            stored[0].last_event_at,
        )
        if stored
        else _Chain(serial, None, None, None, None)
    )
    pending_loads = [
        row
        for row in loads.take(serial)
        if chain.last_event_at is None or row[1] > chain.last_event_at
    ]
    seen_ctcs: set[int] = set()
    tacs = _Tacs(issuer, serial)
    for record in records:
        if not tacs.ok(record):
            writer.exclude(record, BAD_TAC, {"device": record.terminal_id, "suspected": "fraud"})
            continue
        if record.ctc in seen_ctcs or _cleared_before(session, record, chain):
            writer.exclude(record, DUPLICATE, {"ctc": record.ctc})
            continue
        seen_ctcs.add(record.ctc)
        if chain.last_ctc is not None and record.ctc <= chain.last_ctc:
            continue  # a late record filling an earlier gap: its place in the chain passed
        while pending_loads and pending_loads[0][1] <= record.occurred_at:
            _, at, old_balance, amount = pending_loads.pop(0)
            _check_balance(chain, old_balance, at, "load", writer, record)
            chain.balance_after, chain.last_event_at = old_balance + amount, at
        gap = chain.last_ctc is not None and record.ctc > chain.last_ctc + 1
        if gap:
            writer.anomaly(
                record,
                CTC_GAP,
                {
                    "missing_ctcs": [chain.last_ctc + 1, record.ctc - 1],
                    "last_device": chain.last_terminal,
                },
            )
        if not gap:  # a gap explains a balance difference: the missing fares took it
            _check_balance(
                chain, record.balance_before_fen, record.occurred_at, "fare", writer, record
            )
        chain.last_ctc, chain.balance_after = record.ctc, record.balance_after_fen
        chain.last_terminal, chain.last_event_at = record.terminal_id, record.occurred_at
    for _, at, old_balance, amount in pending_loads:
        chain.balance_after, chain.last_event_at = old_balance + amount, at
    if chain.last_ctc is not None:
        writer.save_chain(chain)


def _check_balance(
    chain: _Chain, balance_before: int, at: datetime, what: str, writer: _Writer, record: TapRecord
) -> None:
    if chain.balance_after is not None and balance_before != chain.balance_after:
        writer.anomaly(
            record,
            BALANCE_BREAK,
            {
                "expected_before_fen": chain.balance_after,
                "found_before_fen": balance_before,
                "at": at.isoformat(),
                "event": what,
            },
        )


def _bcd2(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class _Tacs:
    """The TAC check for one card: its key derived once, one ECB context per algorithm."""

    def __init__(self, issuer: IssuerKeys, serial: str) -> None:
        self.issuer, self.serial = issuer, bytes.fromhex(serial)
        self.verifiers: dict[int, TacVerifier] = {}

    def ok(self, record: Any) -> bool:
        verifier = self.verifiers.get(record.algorithm)
        if verifier is None:
            try:
                algorithm = Algorithm(record.algorithm)
            except ValueError:
                return False
            verifier = self.verifiers[record.algorithm] = TacVerifier(
                self.issuer, algorithm, self.serial
            )
        at = record.occurred_at
        expected = verifier.tac(
            amount=record.amount_fen,
            transaction_type=record.transaction_type,
            terminal_id=bytes.fromhex(record.terminal_id),
            terminal_seq=record.terminal_seq,
            date_bcd=bytes(
                (_bcd2(at.year // 100), _bcd2(at.year % 100), _bcd2(at.month), _bcd2(at.day))
            ),
            time_bcd=bytes((_bcd2(at.hour), _bcd2(at.minute), _bcd2(at.second))),
        )
        return hmac.compare_digest(expected, bytes.fromhex(record.tac))


def _cleared_before(session: Session, record: TapRecord, chain: _Chain) -> bool:
    """Only a CTC at or below the chain's last can have been cleared already: ask then."""
    if chain.last_ctc is None or record.ctc > chain.last_ctc:
        return False
    return (
        session.scalar(
            select(func.count()).where(
                TapRecord.card_serial == record.card_serial,
                TapRecord.ctc == record.ctc,
                TapRecord.clearing_run_id != record.clearing_run_id,
                TapRecord.excluded.is_(False),
            )
        )
        > 0
    )


class _Writer:
    """Batched writes of what verification finds, so memory stays bounded."""

    def __init__(self, session: Session, run_id: int, report: RunReport) -> None:
        self.session, self.run_id, self.report = session, run_id, report
        self.exceptions: list[dict[str, Any]] = []
        self.excluded: list[int] = []
        self.chains: list[_Chain] = []

    def exclude(self, record: TapRecord, kind: str, details: dict[str, Any]) -> None:
        self.excluded.append(record.id)
        self.anomaly(record, kind, details)

    def anomaly(self, record: TapRecord, kind: str, details: dict[str, Any]) -> None:
        self.report.exceptions[kind] = self.report.exceptions.get(kind, 0) + 1
        self.exceptions.append(
            {
                "run_id": self.run_id,
                "kind": kind,
                "card_serial": record.card_serial,
                "record_id": record.id,
                "terminal_id": record.terminal_id,
                "details": json.dumps(details, default=str),
            }
        )
        if len(self.exceptions) >= exceptions_batch_max:
            self.flush()

    def save_chain(self, chain: _Chain) -> None:
        self.chains.append(chain)
        if len(self.chains) >= exceptions_batch_max:
            self.flush()

    def flush(self) -> None:
        if self.exceptions:
            self.session.execute(insert(ClearingException), self.exceptions)
        if self.excluded:
            self.session.execute(
                update(TapRecord)
                .where(TapRecord.id.in_(self.excluded))
                .values(excluded=True)
                .execution_options(synchronize_session=False)
            )
        if self.chains:
            _upsert_chains(self.session, self.chains)
        self.exceptions, self.excluded, self.chains = [], [], []


def _upsert_chains(session: Session, chains: list[_Chain]) -> None:
    rows = [
        {
            "card_serial": c.serial,
            "last_ctc": c.last_ctc,
            "last_balance_after_fen": c.balance_after,
            "last_event_at": c.last_event_at,
            "last_terminal_id": c.last_terminal,
        }
        for c in chains
    ]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    statement = upsert(CardClearingState)
    statement = statement.on_conflict_do_update(
        index_elements=["card_serial"],
        set_={name: statement.excluded[name] for name in rows[0] if name != "card_serial"},
    )
    session.execute(statement, rows)


# --- aggregate and settle ------------------------------------------------------------------


def _aggregate(session: Session, run_id: int, business_date: date) -> None:
    day_start = datetime.combine(business_date, time())
    fleet = (
        select(Fleet.code)
        .join(Vehicle, Vehicle.fleet_id == Fleet.id)
        .where(Vehicle.operator_id == TapRecord.operator_id, Vehicle.code == TapRecord.vehicle)
        .limit(1)
        .scalar_subquery()
    )
    adjustment = TapRecord.occurred_at < day_start
    rows = session.execute(
        select(
            TapRecord.operator_id,
            func.coalesce(fleet, ""),
            TapRecord.route,
            TapRecord.vehicle,
            TapRecord.driver,
            adjustment,
            func.count(),
            func.sum(TapRecord.amount_fen),
        )
        .where(TapRecord.clearing_run_id == run_id, TapRecord.excluded.is_(False))
        .group_by(
            TapRecord.operator_id,
            fleet,
            TapRecord.route,
            TapRecord.vehicle,
            TapRecord.driver,
            adjustment,
        )
    ).all()
    if rows:
        session.execute(
            insert(ClearingTotal),
            [
                {
                    "run_id": run_id,
                    "business_date": business_date,
                    "operator_id": r[0],
                    "fleet": r[1],
                    "route": r[2],
                    "vehicle": r[3],
                    "driver": r[4],
                    "adjustment": bool(r[5]),
                    "records": r[6],
                    "amount_fen": r[7],
                }
                for r in rows
            ],
        )


def _settle(session: Session, run_id: int, business_date: date, now: datetime) -> None:
    """Per (card, operator): card float → operator payable, set-based; then per operator
    the fee to the platform and a statement."""
    session.execute(
        text(
            "INSERT INTO accounts (code, kind, debits_fen, credits_fen) "
            "SELECT DISTINCT 'card_float:' || card_serial, 'card_float', 0, 0 FROM tap_records "
            "WHERE clearing_run_id = :run AND NOT excluded "
            "ON CONFLICT (code) DO NOTHING"
        ),
        {"run": run_id},
    )
    fares = (
        "SELECT r.card_serial AS serial, o.code AS operator, sum(r.amount_fen) AS amount "
        "FROM tap_records r JOIN operators o ON o.id = r.operator_id "
        "WHERE r.clearing_run_id = :run AND NOT r.excluded "
        "GROUP BY r.card_serial, o.code"
    )
    session.execute(
        text(
            "INSERT INTO transfers (debit_account_id, credit_account_id, amount_fen, kind, "
            "reference, created_at) "
            f"SELECT d.id, c.id, f.amount, 'fare', 'fare:' || :run || ':' || f.serial || ':' "
            f"|| f.operator, :now FROM ({fares}) f "
            "JOIN accounts d ON d.code = 'card_float:' || f.serial "
            "JOIN accounts c ON c.code = 'operator_payable:' || f.operator"
        ),
        {"run": run_id, "now": now},
    )
    session.execute(
        text(
            "UPDATE accounts SET debits_fen = debits_fen + t.amount FROM "
            "(SELECT debit_account_id AS id, sum(amount_fen) AS amount FROM transfers "
            " WHERE reference LIKE 'fare:' || :run || ':%' GROUP BY debit_account_id) t "
            "WHERE accounts.id = t.id"
        ),
        {"run": run_id},
    )
    session.execute(
        text(
            "UPDATE accounts SET credits_fen = credits_fen + t.amount FROM "
            "(SELECT credit_account_id AS id, sum(amount_fen) AS amount FROM transfers "
            " WHERE reference LIKE 'fare:' || :run || ':%' GROUP BY credit_account_id) t "
            "WHERE accounts.id = t.id"
        ),
        {"run": run_id},
    )
    day_start = datetime.combine(business_date, time())
    per_operator = session.execute(
        select(
            TapRecord.operator_id,
            func.count(),
            func.sum(TapRecord.amount_fen),
            func.sum(case((TapRecord.occurred_at < day_start, TapRecord.amount_fen), else_=0)),
        )
        .where(TapRecord.clearing_run_id == run_id, TapRecord.excluded.is_(False))
        .group_by(TapRecord.operator_id)
    ).all()
    fees = ledger.open_account(session, ledger.FEES, "platform")
    for operator_id, records, gross, adjustments in per_operator:
        operator = session.get_one(Operator, operator_id)
        fee = gross * operator.fee_rate_bp // 10_000  # rounded down: the remainder is theirs
        if fee:
            ledger.post(
                session,
                debit=ledger.open_account(session, ledger.OPERATOR_PAYABLE, operator.code),
                credit=fees,
                amount_fen=fee,
                kind="platform_fee",
                reference=f"fee:{run_id}:{operator.code}",
                at=now,
            )
        session.add(
            SettlementStatement(
                run_id=run_id,
                business_date=business_date,
                operator_id=operator_id,
                records=records,
                gross_fen=gross,
                adjustments_fen=adjustments or 0,
                fee_rate_bp=operator.fee_rate_bp,
                fee_fen=fee,
                net_fen=gross - fee,
            )
        )
    session.flush()


def _hot_list(ctx: Context, run_id: int) -> list[str]:
    """Cards whose anomalies reached ``anomalies_to_hotlist`` (all runs) go on the hot list."""
    session = ctx.session
    touched = select(ClearingException.card_serial).where(ClearingException.run_id == run_id)
    offenders = (
        session.execute(
            select(ClearingException.card_serial)
            .where(
                ClearingException.card_serial.in_(touched),
                ClearingException.kind.in_((BAD_TAC, DUPLICATE, BALANCE_BREAK)),
            )
            .group_by(ClearingException.card_serial)
            .having(func.count() >= anomalies_to_hotlist)
        )
        .scalars()
        .all()
    )
    listed = set(
        session.scalars(
            select(BlacklistChange.card_serial).where(BlacklistChange.card_serial.in_(offenders))
        )
    )
    hot = sorted(set(offenders) - listed)
    for serial in hot:
        blacklist(ctx, serial, "add", "clearing anomalies")
    return hot


# --- reports -------------------------------------------------------------------------------


def day_report(ctx: Context, business_date: date, exceptions_max: int = 500) -> dict[str, Any]:
    """Everything cleared for a business day, over all its runs (a re-run adds nothing)."""
    ctx.principal.require("admin")
    session = ctx.session
    runs = session.scalars(
        select(ClearingRun)
        .where(ClearingRun.business_date == business_date)
        .order_by(ClearingRun.id)
    ).all()
    run_ids = [r.id for r in runs]
    totals = session.execute(
        select(
            Operator.code,
            ClearingTotal.fleet,
            ClearingTotal.route,
            ClearingTotal.vehicle,
            ClearingTotal.driver,
            ClearingTotal.adjustment,
            func.sum(ClearingTotal.records),
            func.sum(ClearingTotal.amount_fen),
        )
        .join(Operator, Operator.id == ClearingTotal.operator_id)
        .where(ClearingTotal.run_id.in_(run_ids))
        .group_by(
            Operator.code,
            ClearingTotal.fleet,
            ClearingTotal.route,
            ClearingTotal.vehicle,
            ClearingTotal.driver,
            ClearingTotal.adjustment,
        )
        .order_by(Operator.code, ClearingTotal.route, ClearingTotal.vehicle, ClearingTotal.driver)
    ).all()
    exceptions = session.scalars(
        select(ClearingException)
        .where(ClearingException.run_id.in_(run_ids))
        .order_by(ClearingException.id)
        .limit(exceptions_max)
    ).all()
    counts = dict(
        session.execute(
            select(ClearingException.kind, func.count())
            .where(ClearingException.run_id.in_(run_ids))
            .group_by(ClearingException.kind)
        ).all()
    )
    return {
        "business_date": business_date.isoformat(),
        "runs": [
            {
                "run_id": r.id,
                "records": r.records,
                "paid_records": r.paid_records,
                "paid_fen": r.paid_fen,
            }
            for r in runs
        ],
        "paid_records": sum(r.paid_records for r in runs),
        "paid_fen": sum(r.paid_fen for r in runs),
        "totals": [
            {
                "operator": t[0],
                "fleet": t[1],
                "route": t[2],
                "vehicle": t[3],
                "driver": t[4],
                "adjustment": bool(t[5]),
                "records": int(t[6]),
                "amount_fen": int(t[7]),
            }
            for t in totals
        ],
        "exception_counts": {kind: int(n) for kind, n in counts.items()},
        "exceptions": [
            {
                "kind": e.kind,
                "card_serial": e.card_serial,
                "terminal_id": e.terminal_id,
                "record_id": e.record_id,
                "details": json.loads(e.details),
            }
            for e in exceptions
        ],
    }


def statements(ctx: Context, operator_code: str, business_date: date) -> list[dict[str, Any]]:
    from wallet_service.services.registry import operator_by_code

    operator = operator_by_code(ctx, operator_code)
    rows = ctx.session.scalars(
        select(SettlementStatement)
        .where(
            SettlementStatement.operator_id == operator.id,
            SettlementStatement.business_date == business_date,
        )
        .order_by(SettlementStatement.run_id)
    ).all()
    return [
        {
            "run_id": s.run_id,
            "records": s.records,
            "gross_fen": s.gross_fen,
            "adjustments_fen": s.adjustments_fen,
            "fee_rate_bp": s.fee_rate_bp,
            "fee_fen": s.fee_fen,
            "net_fen": s.net_fen,
        }
        for s in rows
    ]
