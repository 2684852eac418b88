"""Double-entry ledger in integer fen (TigerBeetle's Account/Transfer model).

A transfer debits one account and credits another by the same positive amount; transfers
are never changed, a mistake is fixed by a reversing transfer. Each account keeps its
posted debits and credits, updated under a row lock in the transfer's own transaction, so
concurrent postings on one account serialize. ``reference`` is unique: the same business
event can post only once, whatever retries happen.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import bindparam, event, func, insert, select, update
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value

from wallet_service.db import at_commit, insert_at_commit, pending, transaction_cache
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


# Built once: every top-up posts twice (built per call, a statement's expression tree and
# cache key cost more CPU than running it).
_CODE_IN = Account.code.in_(bindparam("codes", expanding=True))
_ACCOUNTS_BY_CODE = select(Account).where(_CODE_IN)
# Their ids only, as plain rows: an account object costs the ORM more than its row.
_ACCOUNT_IDS_BY_CODE = select(Account.code, Account.id).where(_CODE_IN)
_INSERT_TRANSFER = insert(Transfer.__table__).inline()  # (no id returned: see insert_at_commit)


def open_accounts(session: Session, *kinds_and_owners: tuple[str, str]) -> list[Account]:
    """Several accounts in one query (a posting's two), created where missing; in the
    order asked."""
    codes = [account_code(kind, owner) for kind, owner in kinds_and_owners]
    found = {a.code: a for a in session.scalars(_ACCOUNTS_BY_CODE, {"codes": codes})}
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
    transfer = Transfer(**_transfer_row(debit.id, credit.id, amount_fen, kind, reference, at))
    session.add(transfer)
    session.flush()
    return transfer


def _transfer_row(
    debit_id: int, credit_id: int, amount_fen: int, kind: str, reference: str, at: datetime
) -> dict:
    return {
        "debit_account_id": debit_id,
        "credit_account_id": credit_id,
        "amount_fen": amount_fen,
        "kind": kind,
        "reference": reference,
        "created_at": at,
    }


# What moves at commit (``post_at_commit``), in Session.info (``transaction_cache``:
# forgotten with the transaction): for each transaction or savepoint open when transfers
# were posted in it, those transfers as (debit id, credit id, amount in fen). A savepoint
# released hands its own to its parent; one rolled back takes its own (and those its
# released savepoints handed it) away, as the database takes their rows; the rest move when
# the transaction commits. So a savepoint's rollback never takes a total whose transfer
# stays, nor leaves one whose transfer went.
_AT_COMMIT = "ledger_transfers_moving_at_commit"
Posted = tuple[int, int, int]


def _moving(session: Session) -> dict[SessionTransaction, list[Posted]]:
    return transaction_cache(session, _AT_COMMIT, dict)


def _innermost(session: Session) -> SessionTransaction:
    """The savepoint, else the transaction, that a statement runs in now."""
    innermost = session.get_nested_transaction() or session.get_transaction()
    assert innermost is not None, "inside a transaction"
    return innermost


def post_at_commit(
    session: Session,
    *,
    debit: tuple[str, str],
    credit: tuple[str, str],
    amount_fen: int,
    kind: str,
    reference: str,
    at: datetime,
) -> None:
    """A transfer for hot accounts (every top-up moves ``topup_pending:platform``), written
    as the transaction commits: its row with the transaction's other transfers in one
    executemany (``db.insert_at_commit``; inside a savepoint, at once), the two accounts'
    totals by one UPDATE per account for all of them, in id order.
    A worker's batch then holds a hot account's row lock only for its commit, not for the
    rest of the batch, and two workers stop queueing behind each other. A savepoint rolled
    back (an exception, a failed flush) takes its transfers' totals with it, as it takes
    their rows (``_AT_COMMIT``). Totals and transfers read inside the transaction do not
    show these transfers yet."""
    assert amount_fen > 0, "a transfer moves a positive amount"
    debit_id, credit_id = _account_ids(session, debit, credit)
    assert debit_id != credit_id, "a transfer moves money between two accounts"
    row = _transfer_row(debit_id, credit_id, amount_fen, kind, reference, at)
    insert_at_commit(session, _INSERT_TRANSFER, row)
    _moving(session).setdefault(_innermost(session), []).append((debit_id, credit_id, amount_fen))


# Account ids a transaction has read (code → id), in Session.info: a worker's batch posts
# every top-up to the same hot accounts, and asks for them once. Forgotten when the
# transaction or any savepoint ends (``transaction_cache``), so an id never outlives a
# rollback of its row.
_IDS = "ledger_account_ids"


def _known_ids(session: Session) -> dict[str, int]:
    return transaction_cache(session, _IDS, dict, savepoints=True)


def _account_ids(session: Session, *kinds_and_owners: tuple[str, str]) -> list[int]:
    known = _known_ids(session)
    codes = [account_code(kind, owner) for kind, owner in kinds_and_owners]
    if not all(code in known for code in codes):
        accounts = open_accounts(session, *kinds_and_owners)
        known.update((account.code, account.id) for account in accounts)
    return [known[code] for code in codes]


def read_account_ids(session: Session, *kinds_and_owners: tuple[str, str]) -> None:
    """Those of these accounts that exist, their ids read in one query for the rest of the
    transaction (a batch that will post to many: one query, not one per posting)."""
    known = _known_ids(session)
    codes = [account_code(kind, owner) for kind, owner in kinds_and_owners]
    missing = [code for code in codes if code not in known]
    if missing:
        rows = session.execute(_ACCOUNT_IDS_BY_CODE, {"codes": missing})
        known.update((code, account_id) for code, account_id in rows)


def _moving_at_commit(session: Session) -> dict[int, list[int]]:
    """account id → [debits, credits] still to move."""
    moves: defaultdict[int, list[int]] = defaultdict(lambda: [0, 0])
    for posted in session.info.get(_AT_COMMIT, {}).values():
        for debit_id, credit_id, amount_fen in posted:
            moves[debit_id][0] += amount_fen
            moves[credit_id][1] += amount_fen
    return moves


# Built once: every worker transaction that posts runs it (see ``_ACCOUNTS_BY_CODE``).
_ACCOUNT_COLUMNS = Account.__table__.c
_MOVE_TOTALS = (
    update(Account.__table__)
    .where(_ACCOUNT_COLUMNS.id == bindparam("account_id"))
    .values(
        debits_fen=_ACCOUNT_COLUMNS.debits_fen + bindparam("debit_fen"),
        credits_fen=_ACCOUNT_COLUMNS.credits_fen + bindparam("credit_fen"),
    )
)


@at_commit(_AT_COMMIT)
def _move_totals(session: Session) -> None:
    """The totals move as the transaction commits, in it (``db.at_commit``: not as a
    savepoint is released — its transfers go to its parent as it closes,
    ``_hand_to_parent``; and never inside a savepoint whose parent could still roll back
    the transfers posted outside it: ``db.SavepointsLeftOpen``)."""
    moves = _moving_at_commit(session)
    session.info.pop(_AT_COMMIT, None)
    session.execute(
        _MOVE_TOTALS,
        [
            {"account_id": account_id, "debit_fen": debit_fen, "credit_fen": credit_fen}
            for account_id, (debit_fen, credit_fen) in sorted(moves.items())
        ],
    )
    for loaded in list(session.identity_map.values()):  # their totals are stale now
        if isinstance(loaded, Account) and loaded.id in moves:
            session.expire(loaded, ["debits_fen", "credits_fen"])


@event.listens_for(Session, "after_rollback")
def _taken_back(session: Session) -> None:
    """The database rolled back the innermost savepoint, or the transaction: what was posted
    in it (and handed to it) is gone. (SQLAlchemy closes the savepoints inside it first.)"""
    moving = session.info.get(_AT_COMMIT)
    if moving:
        rolled_back = _innermost(session)
        if rolled_back.parent is None:
            moving.clear()
        else:
            moving.pop(rolled_back, None)


@event.listens_for(Session, "after_transaction_end")
def _hand_to_parent(session: Session, transaction: SessionTransaction) -> None:
    """A savepoint closed: what was posted in it still to move (it was released, or closed
    as its parent rolled back, which then takes it) is its parent's now."""
    moving = session.info.get(_AT_COMMIT)
    if not transaction.nested or not moving or transaction not in moving:
        return
    parent = transaction.parent
    while parent is not None and not parent.nested and parent.parent is not None:
        parent = parent.parent  # (past a flush's own inner transaction)
    if parent is not None:
        moving.setdefault(parent, []).extend(moving.pop(transaction))


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
    """Sum of debits = sum of credits, in the accounts (with what moves at commit) and in
    the transfers behind them (with those inserted at commit)."""
    debits, credits = session.execute(
        select(
            func.coalesce(func.sum(Account.debits_fen), 0),
            func.coalesce(func.sum(Account.credits_fen), 0),
        )
    ).one()
    moved = session.scalar(select(func.coalesce(func.sum(Transfer.amount_fen), 0)))
    moved += sum(row["amount_fen"] for row in pending(session, _INSERT_TRANSFER))
    for debit_fen, credit_fen in _moving_at_commit(session).values():  # not yet moved
        debits, credits = debits + debit_fen, credits + credit_fen
    if not debits == credits == moved:
        raise AssertionError(
            f"ledger out of balance: debits {debits}, credits {credits}, transfers {moved}"
        )
