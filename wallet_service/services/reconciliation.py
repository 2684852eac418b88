"""Daily three-way match of OTA top-ups (OTA issue §6): the bank's statement (what money
moved), the orders (what passengers asked and paid), the confirmed loads (what the cards'
TACs prove). Findings: paid but not loaded, loaded but not paid, amount mismatches, refunds
the bank shows that the platform does not (and the reverse)."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import or_, select

from wallet_service.errors import InvalidInput
from wallet_service.models import TopUpOrder
from wallet_service.services.registry import Context

statement_lines_max = 1_000_000
STATEMENT_COLUMNS = ["kind", "id", "payment_id", "order_id", "amount_fen", "at"]


def parse_statement(text: str) -> dict[str, dict[str, int]]:
    """Bank statement CSV (reader_sim.bank.Bank.statement) → per order id: paid, refunded."""
    if not text.endswith("\n"):
        raise InvalidInput("a statement ends with a newline (a last line may be cut off)")
    # The bank writes plain comma-separated lines, no quoting (its ids and times hold no
    # commas): split exactly that, as the API's pattern declares it.
    reader = iter(line.removesuffix("\r").split(",") for line in text.split("\n")[:-1])
    if next(reader, None) != STATEMENT_COLUMNS:
        raise InvalidInput(f"a statement's header is {','.join(STATEMENT_COLUMNS)}")
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"paid": 0, "refunded": 0})
    for number, row in enumerate(reader, start=2):
        if number > statement_lines_max:
            raise InvalidInput(f"a statement has at most {statement_lines_max} lines")
        if len(row) != len(STATEMENT_COLUMNS) or row[0] not in ("payment", "refund"):
            raise InvalidInput(f"statement line {number} is malformed")
        try:
            amount = int(row[4])
        except ValueError:
            raise InvalidInput(f"statement line {number}: amount is not an integer") from None
        key = "paid" if row[0] == "payment" else "refunded"
        totals[row[3].upper()][key] += abs(amount)
    return dict(totals)


def reconcile(ctx: Context, day: date, statement_csv: str) -> dict[str, Any]:
    ctx.principal.require("admin")
    bank = parse_statement(statement_csv)
    start = datetime.combine(day, time())
    end = start + timedelta(days=1)
    orders = {
        order.reference: order
        for order in ctx.session.scalars(
            select(TopUpOrder).where(
                or_(
                    TopUpOrder.reference.in_(list(bank)),
                    (TopUpOrder.created_at >= start) & (TopUpOrder.created_at < end),
                )
            )
        )
    }
    findings: list[dict[str, Any]] = []

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
        if net > 0 and order.state != "loaded":
            find("paid_not_loaded", reference, bank_net_fen=net, state=order.state)
        if order.state == "refunded" and money["refunded"] == 0:
            find("refund_not_at_bank", reference, order_fen=order.amount_fen)
        if money["refunded"] and order.state == "loaded":
            find("loaded_and_refunded", reference, refunded_fen=money["refunded"])
    for reference, order in sorted(orders.items()):
        if order.state == "loaded" and bank.get(reference, {}).get("paid", 0) == 0:
            find("loaded_not_paid", reference, order_fen=order.amount_fen)
    loaded = [o for o in orders.values() if o.state == "loaded"]
    return {
        "day": day.isoformat(),
        "bank_paid_fen": sum(m["paid"] for m in bank.values()),
        "bank_refunded_fen": sum(m["refunded"] for m in bank.values()),
        "loaded_fen": sum(o.amount_fen for o in loaded),
        "orders": len(orders),
        "matched": not findings,
        "findings": findings,
    }
