"""Daily three-way match of OTA top-ups (OTA issue §6): the bank's statement (what money
moved), the orders (what passengers asked and paid), the confirmed loads (what the cards'
TACs prove). Findings: paid but not loaded, loaded but not paid, amount mismatches, refunds
the bank shows that the platform does not (and the reverse).

A day's orders are matched by the bank's business day, as a back office does: the orders
whose money moved that day per the statement, those the bank's callbacks said were paid
that day (``paid_at``), and the loads of that day that show no payment at all. An order
paid on one side of midnight and loaded on the other belongs to its payment's day; the
next day's match does not call it loaded but not paid; one refunded on a later day is not
yet a finding."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import or_, select

from wallet_service.errors import InvalidInput
from wallet_service.models import TopUpOrder
from wallet_service.services.registry import Context
from wallet_service.services.topups import SETTLED_UNPROVEN

statement_lines_max = 1_000_000
# reader_sim.bank.Bank.statement: one day's payments and refunds, one row each.
STATEMENT_COLUMNS = ["kind", "id", "payment_id", "order_id", "amount_fen", "at"]
# A payment's amount is what was paid; a refund's is written negated (-refunds.amount_fen);
# never zero, at most 12 digits (as the API's statement pattern bounds it).
# (The API's statement pattern is made of the same pieces.)
PAYMENT_AMOUNT = r"[1-9][0-9]{0,11}"
REFUND_AMOUNT = "-" + PAYMENT_AMOUNT
STATEMENT_AMOUNTS = {"payment": re.compile(PAYMENT_AMOUNT), "refund": re.compile(REFUND_AMOUNT)}
# `at` is the bank's datetime.isoformat() of a time to the second, without a zone.
AT_TO_THE_SECOND = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
STATEMENT_AT = re.compile(AT_TO_THE_SECOND)


@dataclass
class Statement:
    """A day's statement as read: per order id, paid and refunded (both positive); and the
    rows that cannot count for the day (another day's, an impossible time, a row twice),
    each a finding — the rest of the day is still matched."""

    totals: dict[str, dict[str, int]]
    refused_rows: list[dict[str, Any]]


def parse_statement(text: str, day: date) -> Statement:
    """Bank statement CSV of ``day`` (reader_sim.bank.Bank.statement). A shape the bank
    never writes (the API's pattern: header, columns, an amount of the wrong sign, a time
    not to the second) is InvalidInput, naming the line."""
    if not text.endswith("\n"):
        raise InvalidInput("a statement ends with a newline (a last line may be cut off)")
    # The bank writes plain comma-separated lines, no quoting (its ids and times hold no
    # commas): split exactly that, as the API's pattern declares it.
    reader = iter(line.removesuffix("\r").split(",") for line in text.split("\n")[:-1])
    if next(reader, None) != STATEMENT_COLUMNS:
        raise InvalidInput(f"a statement's header is {','.join(STATEMENT_COLUMNS)}")
    statement = Statement(defaultdict(lambda: {"paid": 0, "refunded": 0}), [])
    lines_by_id: dict[str, int] = {}
    for number, row in enumerate(reader, start=2):
        if number > statement_lines_max:
            raise InvalidInput(f"a statement has at most {statement_lines_max} lines")
        kind, row_id, order_id, amount, at = _row(number, row)
        if row_id in lines_by_id:
            reason = f"{kind} {row_id} is on line {lines_by_id[row_id]} already"
        elif at is None:
            reason = "its time is not a real one"
        elif at.date() != day:
            reason = f"dated {at.date()}, not {day} (a statement is one day's)"
        else:
            money = statement.totals[order_id.upper()]
            money["paid" if kind == "payment" else "refunded"] += abs(amount)
            lines_by_id[row_id] = number
            continue
        lines_by_id.setdefault(row_id, number)
        statement.refused_rows.append(
            {"kind": "statement_row_refused", "order": order_id.upper(), "line": number,
             "reason": reason}
        )  # fmt: skip
    statement.totals = dict(statement.totals)
    return statement


def _row(number: int, row: list[str]) -> tuple[str, str, str, int, datetime | None]:
    """One line's kind, id, order id, amount (as written: a refund's negated) and time
    (None: to the second, but no such time, like 2026-11-31)."""
    if len(row) != len(STATEMENT_COLUMNS) or row[0] not in STATEMENT_AMOUNTS:
        raise InvalidInput(f"statement line {number} is malformed", line=number)
    kind, row_id, _, order_id, amount_text, at_text = row
    if not row_id or not order_id:
        raise InvalidInput(f"statement line {number}: id and order_id are needed", line=number)
    if not STATEMENT_AMOUNTS[kind].fullmatch(amount_text):
        sign = "positive" if kind == "payment" else "negative (the bank writes it negated)"
        raise InvalidInput(
            f"statement line {number}: a {kind}'s amount_fen is a {sign} integer, "
            f"not {amount_text!r}",
            line=number,
        )
    if not STATEMENT_AT.fullmatch(at_text):
        raise InvalidInput(
            f"statement line {number}: at is a time like 2026-11-30T10:00:00, not {at_text!r}",
            line=number,
        )
    try:
        at = datetime.fromisoformat(at_text)
    except ValueError:
        at = None
    return kind, row_id, order_id, int(amount_text), at


def reconcile(ctx: Context, day: date, statement_csv: str) -> dict[str, Any]:
    ctx.principal.require("admin")
    statement = parse_statement(statement_csv, day)
    bank = statement.totals
    start = datetime.combine(day, time())
    end = start + timedelta(days=1)

    def on_day(column):  # type: ignore[no-untyped-def]
        return (column >= start) & (column < end)

    def in_day(at: datetime | None) -> bool:
        return at is not None and start <= at < end

    # The day's orders: those its statement names, those the platform was told were paid
    # that day (the bank's paid_at: its business day, whenever the order was made or
    # loaded), loads of that day without any payment, and the day's refunds.
    orders = {
        order.reference: order
        for order in ctx.session.scalars(
            select(TopUpOrder).where(
                or_(
                    TopUpOrder.reference.in_(list(bank)),
                    on_day(TopUpOrder.paid_at),
                    (TopUpOrder.state == "loaded")
                    & TopUpOrder.payment_id.is_(None)
                    & on_day(TopUpOrder.finished_at),
                    (TopUpOrder.state == "refunded") & on_day(TopUpOrder.finished_at),
                )
            )
        )
    }
    findings: list[dict[str, Any]] = list(statement.refused_rows)

    def find(kind: str, reference: str, **details: Any) -> None:
        findings.append({"kind": kind, "order": reference, **details})

    for reference, money in sorted(bank.items()):
        order = orders.get(reference)
        net = money["paid"] - money["refunded"]
        if order is None:
            find("paid_unknown_order", reference, bank_net_fen=net)
            continue
        if money["paid"] and money["paid"] != order.amount_fen:
            find("amount_mismatch", reference, bank_fen=money["paid"], order_fen=order.amount_fen)
        refunded_later = order.state == "refunded" and (order.finished_at or end) >= end
        if net > 0 and order.state != "loaded" and not refunded_later:  # (that refund is
            # on a later day's statement)
            find("paid_not_loaded", reference, bank_net_fen=net, state=order.state)
        if money["refunded"] and order.state == "loaded":
            find("loaded_and_refunded", reference, refunded_fen=money["refunded"])
    for reference, order in sorted(orders.items()):
        money = bank.get(reference, {"paid": 0, "refunded": 0})
        if (
            order.state == "loaded"
            and money["paid"] == 0
            and (in_day(order.paid_at) or order.payment_id is None)
        ):  # (told of a payment the bank does not show: a forged or misrouted callback)
            find("loaded_not_paid", reference, order_fen=order.amount_fen)
        if order.state == "refunded" and in_day(order.finished_at) and money["refunded"] == 0:
            find("refund_not_at_bank", reference, order_fen=order.amount_fen)
    loaded = [o for o in orders.values() if o.state == "loaded"]
    notes = [  # matched (paid, refunded) — but the lost SIM may hold this load
        {"kind": "settled_unproven", "order": reference, "order_fen": order.amount_fen}
        for reference, order in sorted(orders.items())
        if order.state == "refunded" and order.failure == SETTLED_UNPROVEN
    ]
    return {
        "day": day.isoformat(),
        "bank_paid_fen": sum(m["paid"] for m in bank.values()),
        "bank_refunded_fen": sum(m["refunded"] for m in bank.values()),
        "loaded_fen": sum(o.amount_fen for o in loaded),
        "orders": len(orders),
        "matched": not findings,
        "findings": findings,
        "notes": notes,
    }
