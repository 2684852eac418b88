"""The daily three-way match reads the bank's statement exactly as the bank writes it
(reader_sim.bank.Bank.statement) and matches orders by the bank's business day."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.wallet_fixtures import Wallet
from wallet_service.auth import Principal
from wallet_service.errors import InvalidInput
from wallet_service.models import TopUpOrder
from wallet_service.services import reconciliation
from wallet_service.services.registry import Context

HEADER = "kind,id,payment_id,order_id,amount_fen,at\r\n"
DAY = date(2026, 11, 30)
SERIAL = "1000000000000001"


def _reconcile(wallet: Wallet, day: date, statement: str) -> dict[str, Any]:
    def in_context(session):  # type: ignore[no-untyped-def]
        ctx = Context(
            session,
            Principal(0, "admin"),
            wallet.clock(),
            wallet.app.config["KEY_STORE"],
            Path("/nonexistent"),
        )
        return reconciliation.reconcile(ctx, day, statement)

    return wallet.database.run(in_context)


def _order(
    wallet: Wallet,
    reference: str,
    created_at: datetime,
    finished_at: datetime | None,
    payment_id: str | None,
    paid_at: datetime | None = None,
    state: str = "loaded",
    amount_fen: int = 3000,
) -> None:
    with wallet.database.transaction() as session:
        session.add(
            TopUpOrder(
                reference=reference,
                card_serial=SERIAL,
                request_id=reference[-8:],
                phone="13800138000",
                amount_fen=amount_fen,
                state=state,
                payment_id=payment_id,
                paid_at=paid_at,
                created_at=created_at,
                expires_at=created_at + timedelta(minutes=30),
                finished_at=finished_at,
            )
        )


def _payment(payment_id: str, reference: str, amount: str, at: str) -> str:
    return f"payment,{payment_id},{payment_id},{reference},{amount},{at}\r\n"


def _refused(wallet: Wallet, statement: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as refused:
        _reconcile(wallet, DAY, statement)
    return refused.value


def test_a_row_of_another_day_counts_not_and_is_a_finding_naming_its_line(
    wallet: Wallet,
) -> None:
    """(A finding, not a refused statement: the rest of the day is still matched.)"""
    statement = (
        HEADER
        + _payment("pay_1", "NOSUCH-1", "3000", "2026-11-30T10:00:00")
        + _payment("pay_2", "NOSUCH-2", "4000", "2025-01-01T10:00:00")
        + _payment("pay_3", "NOSUCH-3", "5000", "2026-11-31T10:00:00")
    )
    report = _reconcile(wallet, DAY, statement)
    assert report["bank_paid_fen"] == 3000 and not report["matched"]
    refused = [f for f in report["findings"] if f["kind"] == "statement_row_refused"]
    assert [(f["line"], f["order"]) for f in refused] == [(3, "NOSUCH-2"), (4, "NOSUCH-3")]
    assert "2025-01-01" in refused[0]["reason"] and "not a real" in refused[1]["reason"]


@pytest.mark.parametrize(
    "at",
    [
        "2026-11-30",
        "2026-11-30 10:00:00",
        "2026-11-30T10:00",
        "2026-11-30T10:00:00.5",
        "2026-11-30T10:00:00+08:00",
        "20261130T100000",
        "",
    ],
)
def test_a_time_the_bank_would_not_write_is_refused(wallet: Wallet, at: str) -> None:
    error = _refused(wallet, HEADER + _payment("pay_1", "NOSUCH-1", "3000", at))
    assert "line 2" in error.message and "at" in error.message


@pytest.mark.parametrize(
    ("kind", "amount"),
    [
        ("payment", "-5"),
        ("payment", "0"),
        ("payment", "+5"),
        ("payment", "05"),
        ("payment", "5.0"),
        ("payment", " 5"),
        ("refund", "5"),
        ("refund", "-0"),
    ],
)
def test_an_amount_of_the_wrong_sign_or_shape_is_refused(
    wallet: Wallet, kind: str, amount: str
) -> None:
    row = f"{kind},x_1,pay_1,NOSUCH-1,{amount},2026-11-30T10:00:00\r\n"
    error = _refused(wallet, HEADER + row)
    assert "line 2" in error.message and "amount_fen" in error.message


def test_a_refund_counts_as_the_bank_writes_it_negated(wallet: Wallet) -> None:
    statement = (
        HEADER
        + _payment("pay_1", "NOSUCH-1", "3000", "2026-11-30T10:00:00")
        + "refund,ref_1,pay_1,NOSUCH-1,-3000,2026-11-30T10:05:00\r\n"
    )
    report = _reconcile(wallet, DAY, statement)
    assert report["bank_paid_fen"] == 3000 and report["bank_refunded_fen"] == 3000
    assert report["findings"] == [
        {"kind": "paid_unknown_order", "order": "NOSUCH-1", "bank_net_fen": 0}
    ]


def test_a_row_twice_counts_once_and_is_a_finding_naming_its_line_and_id(
    wallet: Wallet,
) -> None:
    row = _payment("pay_1", "NOSUCH-1", "3000", "2026-11-30T10:00:00")
    report = _reconcile(wallet, DAY, HEADER + row + row)
    assert report["bank_paid_fen"] == 3000
    [twice] = [f for f in report["findings"] if f["kind"] == "statement_row_refused"]
    assert twice["line"] == 3 and "pay_1 is on line 2 already" in twice["reason"]


def test_an_order_made_before_midnight_and_paid_after_is_matched_on_its_payment_day(
    wallet: Wallet,
) -> None:
    reference = f"{SERIAL}-0000000A"
    _order(
        wallet,
        reference,
        created_at=datetime(2026, 11, 29, 23, 59, 0),
        finished_at=datetime(2026, 11, 30, 0, 1, 0),
        payment_id="pay_1",
        paid_at=datetime(2026, 11, 30, 0, 0, 30),
    )

    first_day = _reconcile(wallet, date(2026, 11, 29), HEADER)
    assert first_day["matched"] and first_day["orders"] == 0, first_day
    payment_day = _reconcile(
        wallet, DAY, HEADER + _payment("pay_1", reference, "3000", "2026-11-30T00:00:30")
    )
    assert payment_day["matched"] and payment_day["loaded_fen"] == 3000, payment_day


def test_an_order_paid_before_midnight_and_loaded_after_is_not_unpaid_the_next_day(
    wallet: Wallet,
) -> None:
    reference = f"{SERIAL}-0000000B"
    _order(
        wallet,
        reference,
        created_at=datetime(2026, 11, 29, 23, 58, 0),
        finished_at=datetime(2026, 11, 30, 0, 0, 10),
        payment_id="pay_1",
        paid_at=datetime(2026, 11, 29, 23, 59, 50),
    )

    payment_day = _reconcile(
        wallet,
        date(2026, 11, 29),
        HEADER + _payment("pay_1", reference, "3000", "2026-11-29T23:59:50"),
    )
    assert payment_day["matched"] and payment_day["loaded_fen"] == 3000, payment_day
    load_day = _reconcile(wallet, DAY, HEADER)
    assert load_day["matched"] and load_day["loaded_fen"] == 0, load_day


def test_a_load_without_any_payment_is_found_on_the_day_of_the_load(wallet: Wallet) -> None:
    reference = f"{SERIAL}-0000000C"
    _order(
        wallet,
        reference,
        created_at=datetime(2026, 11, 29, 23, 59, 0),
        finished_at=datetime(2026, 11, 30, 0, 1, 0),
        payment_id=None,
    )

    assert _reconcile(wallet, date(2026, 11, 29), HEADER)["matched"]
    load_day = _reconcile(wallet, DAY, HEADER)
    assert load_day["findings"] == [
        {"kind": "loaded_not_paid", "order": reference, "order_fen": 3000}
    ]


def test_the_api_refuses_a_bad_statement_with_the_line(wallet: Wallet) -> None:
    statement = HEADER + _payment("pay_1", "NOSUCH-1", "-5", "2026-11-30T10:00:00")
    status, answer = wallet.call(
        "POST", "/api/v1/bank/reconciliation/2026-11-30", body={"statement_csv": statement}
    )
    assert status == 422, answer
    assert answer["error"]["code"] == "invalid_input"
    assert "statement_csv" in str(answer["error"]), answer  # (the API's pattern says it)


def test_a_load_the_bank_never_paid_is_found_on_the_day_the_platform_was_told_it_was(
    wallet: Wallet,
) -> None:
    """A forged or misrouted callback: the platform holds a payment id the statement lacks."""
    reference = f"{SERIAL}-0000000D"
    _order(
        wallet,
        reference,
        created_at=datetime(2026, 11, 30, 9, 0, 0),
        finished_at=datetime(2026, 11, 30, 9, 0, 1),
        payment_id="pay_forged",
        paid_at=datetime(2026, 11, 30, 9, 0, 0),
    )
    assert _reconcile(wallet, DAY, HEADER)["findings"] == [
        {"kind": "loaded_not_paid", "order": reference, "order_fen": 3000}
    ]


def test_an_order_refunded_on_a_later_day_is_not_yet_a_finding(wallet: Wallet) -> None:
    reference = f"{SERIAL}-0000000E"
    _order(
        wallet,
        reference,
        created_at=datetime(2026, 11, 30, 23, 50, 0),
        finished_at=datetime(2026, 12, 1, 0, 10, 0),
        payment_id="pay_1",
        paid_at=datetime(2026, 11, 30, 23, 50, 10),
        state="refunded",
    )
    paid = HEADER + _payment("pay_1", reference, "3000", "2026-11-30T23:50:10")
    assert _reconcile(wallet, DAY, paid)["matched"]
    refund = HEADER + f"refund,ref_1,pay_1,{reference},-3000,2026-12-01T00:10:00\r\n"
    assert _reconcile(wallet, date(2026, 12, 1), refund)["matched"]
    missing = _reconcile(wallet, date(2026, 12, 1), HEADER)  # not at the bank that day
    assert missing["findings"] == [
        {"kind": "refund_not_at_bank", "order": reference, "order_fen": 3000}
    ]
