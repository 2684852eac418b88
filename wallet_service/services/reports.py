"""What the bus company looks at: ridership and revenue by hour, day, route, vehicle,
driver; record queries (keyset-paginated); CSV downloads streamed in bounded memory."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

from wallet_service.errors import InvalidInput
from wallet_service.models import TapRecord
from wallet_service.services.registry import Context, operator_by_code

page_records_max = 1_000
csv_batch_records = 5_000  # read in one transaction
csv_chunk_records = 500  # handed to the server at once
period_days_max = 366
GROUPINGS = ("hour", "day", "route", "vehicle", "driver")


@dataclass(frozen=True)
class RecordFilter:
    card: str | None = None
    start: date | None = None
    end: date | None = None  # inclusive
    route: str | None = None
    vehicle: str | None = None
    driver: str | None = None
    device: str | None = None


def _filtered(query: Select, operator_id: int, f: RecordFilter) -> Select:
    query = query.where(TapRecord.operator_id == operator_id)
    if f.start and f.end and (f.end - f.start).days > period_days_max:
        raise InvalidInput(f"a period is at most {period_days_max} days")
    if f.start:
        query = query.where(TapRecord.occurred_at >= datetime.combine(f.start, time()))
    if f.end:
        query = query.where(
            TapRecord.occurred_at < datetime.combine(f.end + timedelta(days=1), time())
        )
    for column, value in (
        (TapRecord.card_serial, f.card.upper() if f.card else None),
        (TapRecord.route, f.route),
        (TapRecord.vehicle, f.vehicle),
        (TapRecord.driver, f.driver),
        (TapRecord.terminal_id, f.device.upper() if f.device else None),
    ):
        if value:
            query = query.where(column == value)
    return query


def statistics(ctx: Context, operator_code: str, by: str, f: RecordFilter) -> list[dict[str, Any]]:
    """Rides and revenue (fen) grouped by ``by``; excluded records (bad TAC, duplicates)
    do not count."""
    if by not in GROUPINGS:
        raise InvalidInput(f"group by one of {', '.join(GROUPINGS)}")
    operator = operator_by_code(ctx, operator_code)
    key = {
        "hour": func.extract("hour", TapRecord.occurred_at),
        "day": func.date(TapRecord.occurred_at),
        "route": TapRecord.route,
        "vehicle": TapRecord.vehicle,
        "driver": TapRecord.driver,
    }[by]
    query = (
        _filtered(select(key, func.count(), func.sum(TapRecord.amount_fen)), operator.id, f)
        .where(TapRecord.excluded.is_(False))
        .group_by(key)
        .order_by(key)
    )
    return [
        {"key": _key_text(k), "rides": int(n), "revenue_fen": int(amount or 0)}
        for k, n, amount in ctx.session.execute(query)
    ]


def _key_text(value: Any) -> str:
    if isinstance(value, float):
        value = int(value)
    return value.isoformat() if isinstance(value, date) else str(value)


RECORD_COLUMNS = (
    "id",
    "terminal_id",
    "terminal_seq",
    "card_serial",
    "ctc",
    "amount_fen",
    "balance_before_fen",
    "balance_after_fen",
    "transaction_type",
    "occurred_at",
    "tac",
    "route",
    "vehicle",
    "driver",
    "recovered",
    "excluded",
    "clearing_run_id",
)


def _row(record: Any) -> dict[str, Any]:
    out = {name: getattr(record, name) for name in RECORD_COLUMNS}
    out["occurred_at"] = record.occurred_at.isoformat()
    return out


def query_records(
    ctx: Context, operator_code: str, f: RecordFilter, after_id: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of records after ``after_id`` (keyset pagination: stable under inserts)."""
    if not 1 <= limit <= page_records_max:
        raise InvalidInput(f"limit is 1..{page_records_max}")
    operator = operator_by_code(ctx, operator_code)
    columns = [getattr(TapRecord, name) for name in RECORD_COLUMNS]
    rows = ctx.session.execute(
        _filtered(select(*columns), operator.id, f)
        .where(TapRecord.id > after_id)
        .order_by(TapRecord.id)
        .limit(limit + 1)
    ).all()
    page = [_row(r) for r in rows[:limit]]
    return page, (page[-1]["id"] if len(rows) > limit else None)


Rows = Sequence[Row[Any]]
Read = Callable[[Callable[[Session], Rows]], Rows]  # work in a transaction of its own


def csv_lines(read: Read, operator_id: int, f: RecordFilter) -> Iterator[str]:
    """The whole selection as CSV, ``csv_batch_records`` at a time, in id order: a month
    of records downloads without being held in memory. Each batch is read in a short
    transaction of its own (``read``: ``Database.run``), after the last id sent, as the
    pages of ``query_records`` are: a client reading slowly holds no transaction and no
    connection meanwhile (one held would be ended by the idle-in-transaction limit, and
    the download cut short with nothing to tell). So, as with the pages, the file is not
    one snapshot: a record stored during the download comes in it if its id is after the
    last batch read. InvalidInput (a filter it cannot take) now, not once the answer's
    200 has gone."""
    columns = [getattr(TapRecord, name) for name in RECORD_COLUMNS]
    selection = _filtered(select(*columns), operator_id, f).order_by(TapRecord.id)
    return _csv_batches(read, selection)


def _csv_batches(read: Read, selection: Select) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(RECORD_COLUMNS)
    after_id = 0
    while True:
        batch = read(
            lambda session, after_id=after_id: session.execute(
                selection.where(TapRecord.id > after_id).limit(csv_batch_records)
            ).all()
        )
        for count, record in enumerate(batch, start=1):
            writer.writerow(_row(record).values())
            if count % csv_chunk_records == 0 or count == len(batch):
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        if len(batch) < csv_batch_records:
            break
        after_id = batch[-1].id
    if buffer.tell():  # (the header alone: nothing selected)
        yield buffer.getvalue()
