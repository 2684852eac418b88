"""The ledger's invariants, the audit trail, driver cards from the platform, and keys that
never leave the key store."""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from reader_sim.link import InMemoryLink
from reader_sim.pos import Outcome
from reader_sim.pos_file import open_pos
from sim_applet.personalize import DEMO_DRIVER_MASTER_KEY, DEMO_ISSUER_KEYS
from sim_applet.sim import Sim
from tests.helpers import Clock
from tests.wallet_fixtures import Wallet, set_up_bus_company
from wallet_service import ledger
from wallet_service.db import SavepointsLeftOpen
from wallet_service.models import Account, AuditEvent, Transfer

AT = datetime(2026, 11, 25, 9, 0, 0)


def test_postings_balance_and_mistakes_are_reversed_not_edited(wallet: Wallet) -> None:
    def work(session):  # type: ignore[no-untyped-def]
        cash = ledger.open_account(session, ledger.HALL_CASH, "H1")
        float_ = ledger.open_account(session, ledger.CARD_FLOAT, "C1")
        transfer = ledger.post(
            session,
            debit=cash,
            credit=float_,
            amount_fen=500,
            kind="counter_load",
            reference="t1",
            at=AT,
        )
        ledger.reverse(session, transfer, reason="wrong card", at=AT)
        return ledger.balance(float_), cash.debits_fen, cash.credits_fen

    assert wallet.database.run(work) == (0, 500, 500)


def test_the_same_reference_posts_only_once(wallet: Wallet) -> None:
    def post_twice(session):  # type: ignore[no-untyped-def]
        cash = ledger.open_account(session, ledger.HALL_CASH, "H1")
        float_ = ledger.open_account(session, ledger.CARD_FLOAT, "C1")
        for _ in range(2):
            ledger.post(
                session, debit=cash, credit=float_, amount_fen=1, kind="x", reference="once", at=AT
            )

    with pytest.raises(IntegrityError):
        wallet.database.run(post_twice)


def test_a_transaction_that_unbalances_the_books_is_rolled_back(wallet: Wallet) -> None:
    def tamper(session):  # type: ignore[no-untyped-def]
        ledger.open_account(session, ledger.FEES, "platform").debits_fen += 5

    with pytest.raises(AssertionError, match="out of balance"):
        wallet.database.run(tamper)
    with wallet.database.transaction() as session:
        assert session.scalar(select(Account).where(Account.code == "fees:platform")) is None


def test_a_platform_issued_driver_card_signs_in_on_a_platform_provisioned_pos(
    wallet: Wallet, tmp_path: Path
) -> None:
    company = set_up_bus_company(wallet)
    issued = wallet.ok(
        "POST",
        "/api/v1/operators/BUS1/drivers/D007/cards",
        company.staff_token,
        {"serial": "D0000000000000000042", "expiry": "2030-12-31"},
        status=201,
    )
    perso = Path(wallet.app.config["PERSONALIZATION_DIR"])
    driver_card = Sim.load(perso / issued["image_file"])
    config = json.loads(company.psam_file.read_text())
    config["record_store"] = str(tmp_path / "pos.sqlite")
    (tmp_path / "pos.json").write_text(json.dumps(config))
    pos = open_pos(tmp_path / "pos.json", clock=Clock())
    outcome = pos.present(InMemoryLink(driver_card))
    pos.store.close()
    assert outcome.outcome is Outcome.SIGNED_IN and outcome.detail == "Wang"
    assert issued["expiry"] == str(date(2030, 12, 31))


def test_every_change_is_audited_with_who_and_what(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    card = wallet.ok(
        "POST",
        "/api/v1/cards",
        company.counter_token,
        {"iccid": "8986001234567890123", "phone": "13800138000"},
    )
    wallet.ok(
        "PUT",
        f"/api/v1/cards/{card['serial']}/holder",
        company.counter_token,
        {"name": "Li Lei", "id_type": "resident_id", "id_number": "110101199001011234"},
    )
    with wallet.database.transaction() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    actions = [e.action for e in events]
    for action in (
        "operator.create",
        "route.create",
        "pos.register",
        "card.issue",
        "card.register_holder",
    ):
        assert action in actions
    holder = next(e for e in events if e.action == "card.register_holder")
    assert holder.actor.startswith("counter#") and "110101199001011234" not in holder.details


def test_no_key_appears_in_an_api_answer_or_the_audit_trail(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    secrets_hex = [
        k.hex().lower()
        for k in (
            DEMO_ISSUER_KEYS.load,
            DEMO_ISSUER_KEYS.purchase,
            DEMO_ISSUER_KEYS.tac,
            DEMO_ISSUER_KEYS.maintenance,
            DEMO_ISSUER_KEYS.pin_unblock,
            DEMO_DRIVER_MASTER_KEY,
        )
    ]
    answers = [
        wallet.call(
            "POST",
            "/api/v1/cards",
            company.counter_token,
            {"iccid": "8986001234567890123", "phone": "13800138000"},
        )[1],
        wallet.call("GET", "/api/v1/operators/BUS1/pos-devices", company.staff_token)[1],
        wallet.call("GET", "/api/v1/ledger")[1],
        wallet.call("GET", "/openapi.json")[1],
        wallet.call(
            "POST",
            "/api/v1/operators/BUS1/pos-devices",
            company.staff_token,
            {"terminal_id": "000012000002", "vehicle": "V1201"},
        )[1],
    ]
    with wallet.database.transaction() as session:
        audit = [e.details for e in session.scalars(select(AuditEvent))]
    text = json.dumps(answers).lower() + " ".join(audit).lower()
    for secret in secrets_hex:
        assert secret not in text
    assert "<hidden>" in repr(wallet.app.config["KEY_STORE"])


def test_open_accounts_finds_and_creates_in_the_order_asked(wallet: Wallet) -> None:
    with wallet.database.transaction() as session:
        cash = ledger.open_account(session, ledger.HALL_CASH, "H1")
        float_, again = ledger.open_accounts(
            session, (ledger.CARD_FLOAT, "C9"), (ledger.HALL_CASH, "H1")
        )
        assert again.id == cash.id and float_.code == "card_float:C9" and float_.id is not None
        assert ledger.open_accounts(session, (ledger.HALL_CASH, "H1"))[0].id == cash.id


def _pay_in(session, amount_fen: int, reference: str) -> None:  # type: ignore[no-untyped-def]
    ledger.post_at_commit(
        session,
        debit=(ledger.BANK_SETTLEMENT, "bank"),
        credit=("topup_pending", "platform"),
        amount_fen=amount_fen,
        kind="topup_paid",
        reference=reference,
        at=AT,
    )


def _totals(wallet: Wallet, code: str) -> tuple[int, int]:
    with wallet.database.transaction() as session:
        account = session.scalars(select(Account).where(Account.code == code)).one()
        return account.debits_fen, account.credits_fen


def test_totals_posted_at_commit_move_once_and_leave_with_a_rolled_back_savepoint(
    wallet: Wallet,
) -> None:
    """The books balance at every savepoint and commit (the check runs before each, in
    tests): what is to move at commit counts, and a savepoint rolled back takes its
    transfer and its totals together."""

    def work(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 100, "kept")
        with session.begin_nested():
            _pay_in(session, 20, "kept too")
        try:
            with session.begin_nested():
                _pay_in(session, 7, "rolled back")
                raise RuntimeError("this message fails")
        except RuntimeError:
            pass
        return _totals_in(session)

    assert wallet.database.run(work) == (0, 0)  # (inside, nothing has moved yet)
    assert _totals(wallet, "topup_pending:platform") == (0, 120)
    assert _totals(wallet, "bank_settlement:bank") == (120, 0)

    def fails(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 50, "whole transaction rolled back")
        raise RuntimeError("the worker dies")

    with pytest.raises(RuntimeError):
        wallet.database.run(fails)
    with wallet.database.transaction() as session:
        _pay_in(session, 1, "next")
    assert _totals(wallet, "topup_pending:platform") == (0, 121)
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_a_savepoint_rolled_back_by_a_failed_flush_takes_its_totals_too(wallet: Wallet) -> None:
    """SQLAlchemy rolls such a savepoint back through the flush's own sub-transaction;
    its transfers' totals go with it, so none move."""

    def work(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 100, "kept")
        try:
            with session.begin_nested():
                _pay_in(session, 3000, "rolled back with the flush")
                session.add(Account(code="kept", kind="x", debits_fen=-1, credits_fen=0))
                session.flush()  # the CHECK constraint refuses it
        except IntegrityError:
            pass

    wallet.database.run(work)
    assert _totals(wallet, "topup_pending:platform") == (0, 100)
    assert _totals(wallet, "bank_settlement:bank") == (100, 0)
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_a_released_savepoint_rolled_back_with_its_parent_takes_only_its_own_totals(
    wallet: Wallet,
) -> None:
    """A transfer posted outside two savepoints, one inside the inner one: the inner one
    released, the outer one rolled back — the inner transfer goes with it, and only its
    totals; the outer transfer and its totals stay."""

    def work(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 100, "outside")
        outer = session.begin_nested()
        inner = session.begin_nested()
        _pay_in(session, 5, "inside, released, then rolled back with the outer one")
        inner.commit()
        outer.rollback()
        with session.begin_nested(), session.begin_nested():  # both released: it moves
            _pay_in(session, 20, "two savepoints deep")

    wallet.database.run(work)
    assert _totals(wallet, "topup_pending:platform") == (0, 120)
    assert _totals(wallet, "bank_settlement:bank") == (120, 0)
    with wallet.database.transaction() as session:
        assert sorted(session.scalars(select(Transfer.amount_fen))) == [20, 100]
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_a_savepoint_rolled_back_with_one_still_open_inside_takes_both_totals(
    wallet: Wallet,
) -> None:
    def work(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 100, "outside")
        outer = session.begin_nested()
        _pay_in(session, 3, "in the outer one")
        session.begin_nested()
        _pay_in(session, 4, "in the inner one, left open")
        outer.rollback()  # (SQLAlchemy closes the inner one first)

    wallet.database.run(work)
    assert _totals(wallet, "topup_pending:platform") == (0, 100)
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_a_commit_through_two_open_savepoints_is_refused(wallet: Wallet) -> None:
    """It cannot tell the transaction committing from a savepoint committing through them
    (which would move totals of transfers outside it into a savepoint): refused, nothing
    kept."""

    def work(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 100, "outside")
        session.begin_nested()
        session.begin_nested()
        _pay_in(session, 4, "two savepoints deep, left open")

    with pytest.raises(SavepointsLeftOpen):
        wallet.database.run(work)
    with wallet.database.transaction() as session:
        assert session.scalars(select(Transfer)).all() == []


def test_a_commit_with_a_savepoint_still_open_moves_its_totals(wallet: Wallet) -> None:
    session = wallet.database._sessions()
    with session.begin():
        _pay_in(session, 40, "outside")
        session.begin_nested()
        _pay_in(session, 2, "in a savepoint left open")
    session.close()
    assert _totals(wallet, "topup_pending:platform") == (0, 42)
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def _totals_in(session) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    account = session.scalars(select(Account).where(Account.code == "topup_pending:platform")).one()
    return account.debits_fen, account.credits_fen


def test_the_same_reference_posts_at_commit_only_once(wallet: Wallet) -> None:
    def twice(session):  # type: ignore[no-untyped-def]
        _pay_in(session, 5, "once")
        _pay_in(session, 5, "once")

    with pytest.raises(IntegrityError):
        wallet.database.run(twice)
    with wallet.database.transaction() as session:
        _pay_in(session, 5, "once")
    assert _totals(wallet, "topup_pending:platform") == (0, 5)
