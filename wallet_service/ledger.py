"""Double-entry ledger in integer fen (TigerBeetle's Account/Transfer model).

A transfer debits one account and credits another by the same positive amount; transfers
are never changed, a mistake is fixed by a reversing transfer. Each account keeps its
posted debits and credits, updated under a row lock in the transfer's own transaction, so
concurrent postings on one account serialize. ``reference`` is unique: the same business
event can post only once, whatever retries happen.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from wallet_service.models import Account, Transfer

# Account kinds (the chart of accounts)
BANK_SETTLEMENT = "bank_settlement"  # money at the bank, from bank-card top-ups
HALL_CASH = "hall_cash"  # cash a business hall or agent collected
CARD_FLOAT = "card_float"  # what the platform owes a card holder
OPERATOR_PAYABLE = "operator_payable"  # what the platform owes a bus company
FEES = "fees"  # the platform's income


def account_code(kind: str, owner: str) -> str:
    return f"{kind}:{owner}"


def open_account(session: Session, kind: str, owner: str) -> Account:
    code = account_code(kind, owner)
    account = session.scalar(select(Account).where(Account.code == code))
    if account is None:
        account = Account(code=code, kind=kind, debits_fen=0, credits_fen=0)
        session.add(account)
        session.flush()
    return account


def open_accounts(session: Session, *kinds_and_owners: tuple[str, str]) -> list[Account]:
    """Several accounts in one query (a posting's two), created where missing; in the
    order asked."""
    codes = [account_code(kind, owner) for kind, owner in kinds_and_owners]
    found = {a.code: a for a in session.scalars(select(Account).where(Account.code.in_(codes)))}
    return [
        found[code] if code in found else open_account(session, kind, owner)
        for code, (kind, owner) in zip(codes, kinds_and_owners, strict=True)
    ]


def post(
    session: Session,
    *,
    debit: Account,
    credit: Account,
    amount_fen: int,
    kind: str,
    reference: str,
    at: datetime,
) -> Transfer:
    assert amount_fen > 0, "a transfer moves a positive amount"
    assert debit.id != credit.id, "a transfer moves money between two accounts"
    # Each account's total moves inside the database (UPDATE … RETURNING: the row lock is
    # taken and no stale read can be posted); both rows in id order, so two transfers on
    # the same pair never deadlock.
    movements = sorted(
        ((debit, Account.debits_fen), (credit, Account.credits_fen)),
        key=lambda movement: movement[0].id,
    )
    for account, total in movements:
        moved = session.execute(
            update(Account)
            .where(Account.id == account.id)
            .values({total: total + amount_fen})
            .returning(total),
            execution_options={"synchronize_session": False},
        ).scalar_one()
        set_committed_value(account, total.key, moved)
    transfer = Transfer(
        debit_account_id=debit.id,
        credit_account_id=credit.id,
        amount_fen=amount_fen,
        kind=kind,
        reference=reference,
        created_at=at,
    )
    session.add(transfer)
    session.flush()
    return transfer


def reverse(session: Session, transfer: Transfer, *, reason: str, at: datetime) -> Transfer:
    """Fix a mistake the double-entry way: a new transfer the other way, never an edit."""
    debit = session.get_one(Account, transfer.credit_account_id)
    credit = session.get_one(Account, transfer.debit_account_id)
    return post(
        session,
        debit=debit,
        credit=credit,
        amount_fen=transfer.amount_fen,
        kind=f"reversal:{reason}"[:24],
        reference=f"reversal:{transfer.reference}"[:64],
        at=at,
    )


def balance(account: Account) -> int:
    """Credit-normal balance (liabilities: card float, payables): credits minus debits."""
    return account.credits_fen - account.debits_fen


def check_balanced(session: Session) -> None:
    """Sum of debits = sum of credits, in the accounts and in the transfers behind them."""
    debits, credits = session.execute(
        select(
            func.coalesce(func.sum(Account.debits_fen), 0),
            func.coalesce(func.sum(Account.credits_fen), 0),
        )
    ).one()
    moved = session.scalar(select(func.coalesce(func.sum(Transfer.amount_fen), 0)))
    if not debits == credits == moved:
        raise AssertionError(
            f"ledger out of balance: debits {debits}, credits {credits}, transfers {moved}"
        )
