"""The worker's hot paths skip the ORM's costlier machinery (bench.ota_worker measures it):
rows written at once by ``write_now``, cards and ledger accounts read once per transaction,
a batch's cards read in one query, rare work looked for once a second. Each must keep the
meaning of what it replaces — on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bench import ota_worker
from otar.keys import derive_keyset
from reader_sim.bank import Bank, new_webhook_secret
from reader_sim.smsc import SmsCentre
from tests.helpers import purse
from tests.test_wallet_cards_and_loads import issue_card
from tests.test_wallet_ledger_and_registry import _pay_in
from tests.test_wallet_topups import BANK_CARD, PHONE, World, _real_now
from tests.wallet_fixtures import Wallet, set_up_bus_company
from wallet_service import audit, ledger
from wallet_service.db import write_all_now, write_now
from wallet_service.models import (
    Account,
    AuditEvent,
    BankWebhookEvent,
    Card,
    OtaRekey,
    TopUpOrder,
    Transfer,
)
from wallet_service.ota_channel import CardKeysets, derived_keyset
from wallet_service.services import cards, topups
from wallet_service.sms_gateway import InProcessGateway
from wallet_service.worker import Worker, rare_work_look_s


@contextmanager
def statements(wallet: Wallet) -> Iterator[list[str]]:
    """The SQL statements run meanwhile."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_) -> None:  # type: ignore[no-untyped-def]
        if not statement.startswith("BEGIN"):  # (SQLite's BEGIN IMMEDIATE)
            seen.append(" ".join(statement.split()))

    engine = wallet.database.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


AT = datetime(2026, 12, 1, 10, 0)


def _load(session, serial: str, reference: str) -> None:  # type: ignore[no-untyped-def]
    """A load's posting: 1 yuan from top-ups pending to the card's float."""
    ledger.post_at_commit(
        session,
        debit=("topup_pending", "platform"),
        credit=(ledger.CARD_FLOAT, serial),
        amount_fen=100,
        kind="topup_loaded",
        reference=reference,
        at=AT,
    )


def _order(session, reference: str) -> TopUpOrder:  # type: ignore[no-untyped-def]
    return session.scalar(select(TopUpOrder).where(TopUpOrder.reference == reference))


def test_write_now_writes_the_changed_columns_once_and_leaves_nothing_to_flush(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = World(wallet, tmp_path)
    reference = world.order(3000)
    with wallet.database.transaction() as session:
        order = _order(session, reference)
        order.state, order.attempts, order.failure = "failed", 4, order.failure  # (unchanged)
        with statements(wallet) as seen:
            write_now(session, order)
            session.flush()  # nothing left for the unit of work
            assert seen == []  # (held until the next statement)
            state = session.scalar(select(TopUpOrder.state).where(TopUpOrder.id == order.id))
        assert state == "failed" and len(seen) == 2 and seen[1].startswith("SELECT")
        assert seen[0].startswith("UPDATE topup_orders SET ")
        assert "state" in seen[0] and "attempts" in seen[0] and "failure" not in seen[0]
        assert order not in session.dirty
    with wallet.database.transaction() as session:
        assert (_order(session, reference).state, _order(session, reference).attempts) == (
            "failed",
            4,
        )


def test_a_new_order_is_the_sessions_object_as_a_query_would_load_it(
    wallet: Wallet, tmp_path: Path
) -> None:
    """``create_order`` inserts with Core and makes the object from what it inserted
    (``as_loaded``): it must be the session's one object for the row, clean, with every
    column as the row has it."""
    world = World(wallet, tmp_path)

    def created(ctx):  # type: ignore[no-untyped-def]
        order = topups.create_order(ctx, world.serial, b"\x00\x00\x00\x01", 3000, PHONE)
        assert order in ctx.session and order not in ctx.session.dirty | ctx.session.new
        with statements(wallet) as seen:
            columns = {column.key: getattr(order, column.key) for column in TopUpOrder.__table__.c}
            assert seen == []  # every column known: none read again
            assert _order(ctx.session, order.reference) is order
            ctx.session.flush()  # nothing for the unit of work to write
        assert len(seen) == 1 and seen[0].startswith("SELECT")
        order.state = "failed"
        with statements(wallet) as seen:
            write_now(ctx.session, order)
            assert seen == []  # (held until the next statement, here the commit)
            ctx.session.execute(select(1))
        assert len(seen) == 2 and "state" in seen[0] and "reference" not in seen[0]
        return columns | {"state": "failed"}

    as_created = world.run(created)
    with wallet.database.transaction() as session:
        row = _order(session, as_created["reference"])
        assert {key: getattr(row, key) for key in as_created} == as_created


def test_rows_written_outside_a_savepoint_go_together_before_the_next_statement(
    wallet: Wallet, tmp_path: Path
) -> None:
    """``write_now`` outside a savepoint holds its UPDATE until the session's next
    statement, flush, savepoint or commit: rows of a table changed in the same columns go
    in one executemany, nothing reads the database before they are written, and a
    rolled-back transaction's are never sent."""
    world = World(wallet, tmp_path)
    references = [world.order(3000) for _ in range(3)]
    in_order = select(TopUpOrder.attempts, TopUpOrder.state).order_by(TopUpOrder.id)
    with wallet.database.transaction() as session:
        orders = [_order(session, reference) for reference in references]
        with statements(wallet) as seen:
            for n, order in enumerate(orders):
                order.attempts = n + 1
                write_now(session, order)
            orders[2].state = "failed"
            write_now(session, orders[2])  # (held with its first: one row, both columns)
            assert seen == []
            read = session.execute(in_order).all()
        assert [tuple(row) for row in read] == [(1, "created"), (2, "created"), (3, "failed")]
        # two rows changed in the same columns: one statement (an executemany); the third
        # in its own
        assert seen[0].startswith("UPDATE topup_orders SET attempts=")
        assert seen[1].startswith("UPDATE topup_orders SET state=")
        assert len(seen) == 3 and "state" in seen[1] and seen[2].startswith("SELECT")
    with (
        pytest.raises(RuntimeError),
        wallet.database.transaction() as session,
        statements(wallet) as seen,
    ):
        for order in [_order(session, reference) for reference in references]:
            order.attempts = 9
            write_now(session, order)
        raise RuntimeError("the worker dies")
    assert not any(s.startswith("UPDATE") for s in seen)
    with wallet.database.transaction() as session:
        assert [tuple(row) for row in session.execute(in_order)] == [
            (1, "created"),
            (2, "created"),
            (3, "failed"),
        ]


def test_a_requests_order_goes_in_before_the_held_updates_which_go_at_commit(
    wallet: Wallet, tmp_path: Path
) -> None:
    """A batch's proofs of receipt hold their orders' UPDATEs; a request between them
    inserts its order without writing them first (it cannot see them: its unique keys are
    ones no UPDATE changes), so they all go in one executemany at commit."""
    world = World(wallet, tmp_path)
    references = [world.order(3000) for _ in range(2)]

    def proofs_around_a_request(ctx):  # type: ignore[no-untyped-def]
        first, second = (_order(ctx.session, reference) for reference in references)
        cards.find_card(ctx.session, world.serial)  # (read ahead for a batch, as its phones')
        with statements(wallet) as seen:
            first.attempts = 5
            write_now(ctx.session, first)
            new = topups.create_order(ctx, world.serial, b"\x00\x00\x00\x09", 100, PHONE)
            second.attempts = 6
            write_now(ctx.session, second)
            assert [s.split(" ")[0] for s in seen] == ["INSERT"]  # (the order only)
        return new.reference

    with statements(wallet) as committed:
        new_reference = world.run(proofs_around_a_request)
    updates = [s for s in committed if s.startswith("UPDATE topup_orders")]
    assert len(updates) == 1 and "attempts" in updates[0]  # both rows, one executemany
    with wallet.database.transaction() as session:
        attempts = [_order(session, r).attempts for r in (*references, new_reference)]
    assert attempts == [5, 6, 0]


def test_the_commit_hooks_statements_are_pipelined_on_postgresql(
    wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held UPDATEs, INSERTs and ledger totals go to PostgreSQL without waiting for each
    answer (psycopg's pipeline mode): one round trip for all of them. A transaction with
    nothing to do as it commits opens no pipeline (an empty one costs a round trip)."""
    from wallet_service import db

    seen: list[bool] = []
    pipelines: list[Session] = []
    real_pipelined = db._pipelined

    def counted(session):  # type: ignore[no-untyped-def]
        pipelines.append(session)
        return real_pipelined(session)

    def pipelined(session) -> None:  # type: ignore[no-untyped-def]
        raw = session.connection().connection.dbapi_connection
        pgconn = getattr(raw, "pgconn", None)  # (psycopg's; SQLite has none)
        seen.append(pgconn is not None and pgconn.pipeline_status != 0)  # 0: OFF

    monkeypatch.setattr(db, "_pipelined", counted)
    monkeypatch.setattr(db, "_commit_hooks", [*db._commit_hooks, ("test_work", pipelined)])
    with wallet.database.transaction() as session:
        session.info["test_work"] = True
        _pay_in(session, 10, "pipelined")
    assert seen == [wallet.database.engine.dialect.name == "postgresql"]
    assert len(pipelines) == 1
    with wallet.database.transaction() as session:
        session.scalar(select(func.count()).select_from(Transfer))  # (nothing to write)
    assert len(pipelines) == 1 and len(seen) == 1


def test_work_run_as_one_statement_may_hold_nothing_for_its_commit(wallet: Wallet) -> None:
    """On PostgreSQL such work runs in autocommit: what it held for its commit — a ledger
    transfer here — would not be all-or-nothing with its statement. It is refused."""
    from wallet_service.db import NotOneStatement

    with pytest.raises(NotOneStatement):
        wallet.database.run(lambda session: _pay_in(session, 10, "held"), one_statement=True)
    with wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Transfer)) == 0


def test_work_run_as_one_statement_cannot_send_a_second(wallet: Wallet) -> None:
    """Refused before it is sent: in autocommit the first has committed already."""
    from wallet_service.db import NotOneStatement

    def two(session: Session) -> None:
        session.execute(select(literal_column("'first'")))
        session.execute(select(literal_column("'second'")))

    with statements(wallet) as sent, pytest.raises(NotOneStatement):
        wallet.database.run(two, one_statement=True)
    assert [s for s in sent if "first" in s or "second" in s] == ["SELECT 'first'"]
    wallet.database.run(lambda session: session.execute(select(1)), one_statement=True)
    for _ in range(12):  # (the pooled connections again: none still refuses a second)
        wallet.database.run(two)


def test_a_new_order_whose_savepoint_rolls_back_leaves_the_session(
    wallet: Wallet, tmp_path: Path
) -> None:
    """As an SMS batch handled one savepoint per message: a request's order rolled back
    with its message's savepoint is out of the session, and the next message's order —
    on SQLite, under the same id again — is its own object with its own values."""
    world = World(wallet, tmp_path)

    def two_messages(ctx):  # type: ignore[no-untyped-def]
        failed = ctx.session.begin_nested()
        gone = topups.create_order(ctx, world.serial, b"\x00\x00\x00\x01", 1000, PHONE)
        failed.rollback()  # (the message failed after its order was made)
        assert gone not in ctx.session
        with ctx.session.begin_nested():
            kept = topups.create_order(ctx, world.serial, b"\x00\x00\x00\x02", 2000, PHONE)
        assert (kept.request_id, kept.amount_fen) == ("00000002", 2000)
        assert _order(ctx.session, kept.reference) is kept
        return kept.reference

    reference = world.run(two_messages)
    with wallet.database.transaction() as session:
        assert [order.reference for order in session.scalars(select(TopUpOrder))] == [reference]


def test_write_now_inside_a_savepoint_rolled_back_is_undone(wallet: Wallet, tmp_path: Path) -> None:
    world = World(wallet, tmp_path)
    reference = world.order(3000)
    with wallet.database.transaction() as session:
        order = _order(session, reference)
        savepoint = session.begin_nested()
        order.state = "failed"
        write_now(session, order)
        savepoint.rollback()
        assert session.scalar(select(TopUpOrder.state).where(TopUpOrder.id == order.id)) == (
            "created"
        )
        assert order.state == "created"  # the ORM's object is reloaded as the row is


def test_write_now_in_a_savepoint_released_then_rolled_back_with_its_parent_is_undone(
    wallet: Wallet, tmp_path: Path
) -> None:
    reference = World(wallet, tmp_path).order(3000)
    with wallet.database.transaction() as session:
        order = _order(session, reference)
        outer = session.begin_nested()
        inner = session.begin_nested()
        order.state = "failed"
        write_now(session, order)
        inner.commit()  # released: its changes now belong to the outer savepoint
        outer.rollback()
        assert order.state == "created"


def test_packet_1s_card_lock_reads_the_card_as_another_transaction_left_it(
    pg_wallet: Wallet, tmp_path: Path
) -> None:
    """The packets' keys come from the cards locked: read as committed, not as loaded
    before the lock (a rekey may have moved the key version meanwhile)."""
    serial = World(pg_wallet, tmp_path).serial

    def rekeyed(session) -> None:  # type: ignore[no-untyped-def]
        session.execute(update(Card).where(Card.serial == serial).values(ota_key_version=2))

    with pg_wallet.database.transaction() as session:
        card = cards.find_card(session, serial)
        assert card.ota_key_version == 1
        pg_wallet.database.run(rekeyed)  # another transaction, committed
        topups._lock_cards(SimpleNamespace(session=session), [serial])
        assert card.ota_key_version == 2


def test_find_card_answers_from_the_cards_its_transaction_loaded(
    wallet: Wallet, tmp_path: Path
) -> None:
    serial = World(wallet, tmp_path).serial
    with wallet.database.transaction() as session, statements(wallet) as seen:
        card = cards.find_card(session, serial)
        assert cards.find_card(session, serial.lower()) is card
        assert len(seen) == 1
    with wallet.database.transaction() as session, statements(wallet) as seen:
        cards.find_card(session, serial)  # a new transaction reads again
        assert len(seen) == 1
        assert cards.find_card(session, serial, lock=True) is not None  # a lock is a query
        assert len(seen) == 2
        session.expire(cards.find_card(session, serial))
        assert cards.find_card(session, serial).serial == serial  # expired: read again
        assert len(seen) == 3


def test_a_cards_keyset_is_derived_once_per_version_and_masters() -> None:
    masters, iccid = (b"\x11" * 16, b"\x22" * 16), "8986001234567890123"
    assert derived_keyset(*masters, iccid, 1) is derived_keyset(*masters, iccid, 1)
    assert derived_keyset(*masters, iccid, 1) == derive_keyset(*masters, iccid, 1)
    assert derived_keyset(*masters, iccid, 2) == derive_keyset(*masters, iccid, 2)
    other_masters = (b"\x33" * 16, b"\x22" * 16)
    assert derived_keyset(*other_masters, iccid, 1) == derive_keyset(*other_masters, iccid, 1)
    assert derived_keyset(*other_masters, iccid, 1) != derived_keyset(*masters, iccid, 1)


def test_a_batch_reads_its_phones_cards_at_once_and_chooses_as_one_by_one(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The active card of a phone first; else the one it reported lost, the newest."""
    world = World(wallet, tmp_path)
    phone = "13800009999"

    def new_card(iccid: str, status: str) -> None:
        def add(session) -> None:  # type: ignore[no-untyped-def]
            template = cards.find_card(session, world.serial)
            session.add(
                Card(
                    serial=iccid[-16:],
                    iccid=iccid,
                    phone=phone,
                    algorithm=template.algorithm,
                    status=status,
                    issued_at=template.issued_at,
                    image_file="-",
                )
            )

        wallet.database.run(add)

    new_card("8986009999000000001", "lost")
    new_card("8986009999000000002", "lost")
    phones = {phone, PHONE, "nobody"}
    with wallet.database.transaction() as session:
        one_by_one = {number: CardKeysets(session, (b"", b"")).card_of(number) for number in phones}
        batch = CardKeysets(session, (b"", b""))
        with statements(wallet) as seen:
            batch.read_phones(phones)
            at_once = {number: batch.card_of(number) for number in phones}
        assert len(seen) == 1 and at_once == one_by_one
        assert at_once[phone].iccid == "8986009999000000002" and at_once["nobody"] is None
    new_card("8986009999000000003", "active")
    with wallet.database.transaction() as session:
        batch = CardKeysets(session, (b"", b""))
        batch.read_phones({phone})
        assert batch.card_of(phone).iccid == "8986009999000000003"


def test_an_account_created_in_a_savepoint_rolled_back_is_created_again(
    wallet: Wallet,
) -> None:
    """Account ids are read once per transaction — and forgotten with a savepoint, which
    may take the account's row with it."""

    def post(session, reference: str) -> None:  # type: ignore[no-untyped-def]
        _load(session, "NEWCARD", reference)

    with wallet.database.transaction() as session:
        savepoint = session.begin_nested()
        post(session, "topup_loaded:1")
        post(session, "topup_loaded:2")  # the account's id from what was read
        savepoint.rollback()
        post(session, "topup_loaded:3")  # the account created again, not the old id used
    with wallet.database.transaction() as session:
        account = session.scalar(select(Account).where(Account.code == "card_float:NEWCARD"))
        assert ledger.balance(account) == 100
        assert session.scalars(select(Transfer.reference)).all() == ["topup_loaded:3"]
        ledger.check_balanced(session)


def test_the_worker_looks_for_refunds_at_most_once_a_look_interval(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = World(wallet, tmp_path)
    worker = Worker(wallet.app, InProcessGateway(SmsCentre(), "10658888"), world.bank)
    first = world.order(2000)
    world.pay(first, amount=2500)  # the wrong amount: refunded
    worker.do_due_work()
    assert world.state(first) == "refunded"
    second = world.order(2000)
    world.pay(second, amount=2500)
    worker.rare_work_looked_at = time.monotonic()  # as if it had just looked
    worker.do_due_work()
    assert world.state(second) == "refunding"  # not looked for again yet
    worker.rare_work_looked_at -= rare_work_look_s  # the interval passed
    worker.do_due_work()
    assert world.state(second) == "refunded"


def test_totals_move_from_what_was_posted_and_a_rollback_reads_nothing_back(
    wallet: Wallet,
) -> None:
    """The totals at commit come from the transfers as posted; a savepoint rolled back
    takes its own out of them, with no query for what is left."""

    def post(session, reference: str) -> None:  # type: ignore[no-untyped-def]
        _pay_in(session, 10, reference)

    def transfers_read(seen: list[str]) -> int:  # (the tests' balance check sums them all)
        return sum(s.startswith("SELECT") and "FROM transfers WHERE" in s for s in seen)

    with statements(wallet) as seen, wallet.database.transaction() as session:
        post(session, "paid:1")
        post(session, "paid:2")
        savepoint = session.begin_nested()
        post(session, "paid:3")
        savepoint.rollback()
    assert transfers_read(seen) == 0
    assert sum(s.startswith("UPDATE accounts") for s in seen) == 1  # (both, one executemany)
    with wallet.database.transaction() as session:
        account = session.scalar(select(Account).where(Account.code == "topup_pending:platform"))
        assert (account.debits_fen, account.credits_fen) == (0, 20)
        ledger.check_balanced(session)


def test_write_all_now_writes_rows_changed_alike_in_one_update(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = World(wallet, tmp_path)
    references = [world.order(3000) for _ in range(3)]
    with wallet.database.transaction() as session:
        orders = [_order(session, reference) for reference in references]
        for order in orders:
            order.state = "failed"
        orders[2].attempts = 7  # changed otherwise: an UPDATE of its own
        with statements(wallet) as seen:
            write_all_now(session, orders)
            session.flush()  # nothing left for the unit of work
        assert len(seen) == 1 and seen[0].startswith("UPDATE topup_orders SET ")
        assert " IN (" in seen[0]  # (the third is held until the next statement)
        assert not session.dirty
        with statements(wallet) as seen:
            savepoint = session.begin_nested()  # the held UPDATE goes first, outside it
        assert len(seen) == 1 and "attempts" in seen[0] and " IN (" not in seen[0]
        orders[0].state = "loaded"
        orders[1].state = "loaded"
        write_all_now(session, orders[:2])
        savepoint.rollback()
        assert [order.state for order in orders] == ["failed"] * 3  # read again
    with wallet.database.transaction() as session:
        written = [_order(session, reference) for reference in references]
        assert [(o.state, o.attempts) for o in written] == [
            ("failed", 0),
            ("failed", 0),
            ("failed", 7),
        ]


def test_a_batch_of_callbacks_locks_its_orders_at_once(wallet: Wallet, tmp_path: Path) -> None:
    """One statement locks the batch's orders, one marks the events processed (one more
    for an event changed otherwise: a payment for an order never made, to send back)."""
    world = World(wallet, tmp_path)
    references = [world.order(3000) for _ in range(3)]
    for reference in [*references, "NO-SUCH-ORDER"]:
        world.bank.pay("BUSCARD", reference, 3000, BANK_CARD)
    world.deliver_callbacks()
    with statements(wallet) as seen:
        assert world.run(lambda ctx: topups.process_bank_events(ctx)) == 4
    locks = [s for s in seen if s.startswith("SELECT") and "FROM topup_orders" in s]
    assert len(locks) == 1 and "topup_orders.reference IN" in locks[0]
    assert sum(s.startswith("UPDATE bank_webhook_events") for s in seen) == 2
    assert [world.state(reference) for reference in references] == ["paid"] * 3
    with wallet.database.transaction() as session:
        events = session.scalars(select(BankWebhookEvent)).all()
        assert all(event.processed_at is not None for event in events)
        assert sum(event.refund_due_at is not None for event in events) == 1


def test_an_order_paid_in_the_workers_pass_is_written_once_with_its_packet_1(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The worker's pass hands the orders it paid to ``work_batch`` unwritten: each is
    written once, paid and stepped. Two orders of one card paid together: the one made
    first sends packet 1, the other waits for it — as when each was written paid first."""
    world = World(wallet, tmp_path)
    first, second = world.order(3000), world.order(3000)
    for reference in (second, first):  # (the bank tells the later order first)
        world.bank.pay("BUSCARD", reference, 3000, BANK_CARD)
    world.deliver_callbacks()

    def callbacks_and_packets(ctx):  # type: ignore[no-untyped-def]
        paid: list[TopUpOrder] = []
        assert topups.process_bank_events(ctx, paid=paid) == 2
        return [
            step.action for step in topups.work_batch(ctx, world.channel, world.bank, paid=paid)
        ]

    with statements(wallet) as seen:
        actions = world.run(callbacks_and_packets)
    assert actions == ["packet 1 sent", "waiting for the card's other top-up"]
    order_updates = [s for s in seen if s.startswith("UPDATE topup_orders")]
    assert len(order_updates) == 2 and all("payment_id" in s for s in order_updates)
    assert [world.state(first), world.state(second)] == ["init_sent", "paid"]
    assert len(world.channel.sent) == 1
    with wallet.database.transaction() as session:
        orders = [_order(session, reference) for reference in (first, second)]
        assert all(order.payment_id and order.paid_fen == 3000 for order in orders)


def test_the_orders_a_pass_paid_count_against_its_batch_limit(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = World(wallet, tmp_path)
    earlier = world.order(3000)
    world.pay(earlier)  # paid and due, not stepped yet
    later = world.order(3000)
    world.bank.pay("BUSCARD", later, 3000, BANK_CARD)
    world.deliver_callbacks()

    def one_order_batch(ctx):  # type: ignore[no-untyped-def]
        paid: list[TopUpOrder] = []
        topups.process_bank_events(ctx, paid=paid)
        batch = topups.work_batch(ctx, world.channel, world.bank, limit=1, paid=paid)
        return [step.action for step in batch]

    assert world.run(one_order_batch) == ["waiting for the card's other top-up"]
    assert world.work() == "packet 1 sent"  # the earlier order, next
    assert [world.state(earlier), world.state(later)] == ["init_sent", "paid"]


_ORDER_STATES = ("created", "paid", "init_sent", "credit_sent", "proving", "loaded", "refunding")
_REKEY_STATES = ("waiting", "put_key_sent", "probing", "done")


@st.composite
def _cards_under_way(draw):  # type: ignore[no-untyped-def]
    """For three cards: their orders (state, step) and rekeys (state, counter base,
    attempts), and which order of each card comes first in the batch."""
    cards_drawn = []
    for _ in range(3):
        orders = draw(
            st.lists(
                st.tuples(st.sampled_from(_ORDER_STATES), st.none() | st.integers(1, 40)),
                min_size=1,
                max_size=4,
            )
        )
        rekeys = draw(
            st.lists(
                st.tuples(st.sampled_from(_REKEY_STATES), st.integers(1, 40), st.integers(0, 3)),
                max_size=2,
            )
        )
        cards_drawn.append((orders, rekeys, draw(st.integers(0, len(orders) - 1))))
    return cards_drawn


@pytest.fixture
def three_cards(wallet: Wallet) -> list[str]:
    company = set_up_bus_company(wallet)
    serials = []
    for index in range(3):
        iccid, phone = f"89860012345678901{index:02d}", f"1380013800{index}"
        serials.append(issue_card(wallet, company.counter_token, iccid, phone)[0]["serial"])
    return serials


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cards_drawn=_cards_under_way())
def test_a_batchs_card_situations_read_at_once_are_each_orders_own(
    wallet: Wallet, three_cards: list[str], cards_drawn
) -> None:  # type: ignore[no-untyped-def]
    """``_first_situations`` answers for the first order of each card as that order's own
    query would (its counter up to the order's own step: ``_next_step`` takes the larger)."""
    with wallet.database.transaction() as session:
        ctx = SimpleNamespace(session=session)
        batch, later = [], []
        for serial, (orders, rekeys, first) in zip(three_cards, cards_drawn, strict=True):
            made = []
            for index, (state, step) in enumerate(orders):
                made.append(
                    TopUpOrder(
                        reference=f"{serial}-{index}",
                        card_serial=serial,
                        request_id=f"{index:08d}",
                        phone="13800138000",
                        amount_fen=100,
                        state=state,
                        step=step,
                        attempts=0,
                        init_attempts=0,
                        created_at=AT,
                        expires_at=AT,
                    )
                )
            for state, base, attempts in rekeys:
                session.add(
                    OtaRekey(
                        card_serial=serial,
                        from_version=1,
                        to_version=2,
                        state=state,
                        counter_base=base,
                        attempts=attempts,
                        created_at=AT,
                    )
                )
            session.add_all(made)
            session.flush()
            batch.append(made[first])
            later.extend(order for order in made if order is not made[first])
        known = topups._first_situations(ctx, batch + later)  # (later ones: their own query)
        assert sorted(known) == sorted(order.id for order in batch)
        for order in batch:
            rekeying, other, counter, status = topups._card_situation(ctx, order)
            batch_rekeying, batch_other, batch_counter, batch_status = known[order.id]
            assert (batch_rekeying, batch_other, batch_status) == (rekeying, other, status)
            own = order.step or 0
            assert max(own, batch_counter) == max(own, counter)
        session.rollback()


def test_a_batch_of_several_cards_steps_each_order_as_alone(wallet: Wallet, tmp_path: Path) -> None:
    """Three cards, four paid orders due in one batch: one query answers for the first
    order of each card, the second order of a card asks its own after the first's step is
    written — and waits for it, while the other cards' orders send their packet 1."""
    world = World(wallet, tmp_path)
    company = set_up_bus_company(wallet, code="BUS2", terminal_id="000012000002")
    phones = {world.serial: PHONE}
    for index in range(2):
        phone = f"1390013900{index}"
        card, _ = issue_card(wallet, company.counter_token, f"89860099999999999{index:02d}", phone)
        phones[card["serial"]] = phone
    serials = [world.serial, world.serial, *list(phones)[1:]]

    def paid_orders(ctx):  # type: ignore[no-untyped-def]
        made = [
            topups.create_order(ctx, serial, index.to_bytes(4, "big"), 100, phones[serial])
            for index, serial in enumerate(serials)
        ]
        ctx.session.execute(
            update(TopUpOrder).values(
                state="paid", payment_id="pay", paid_fen=100, next_action_at=ctx.now
            )
        )
        return [order.id for order in made]

    ids = world.run(paid_orders)
    with statements(wallet) as seen:
        steps = world.run(lambda ctx: topups.work_batch(ctx, world.channel, world.bank))
    assert {step.order_id: step.action for step in steps} == {  # (in whichever order)
        ids[0]: "packet 1 sent",
        ids[1]: "waiting for the card's other top-up",
        ids[2]: "packet 1 sent",
        ids[3]: "packet 1 sent",
    }
    situations = [s for s in seen if "FROM ota_rekeys" in s and s.startswith("SELECT")]
    assert len(situations) == 2 and "cards.serial IN" in situations[0]  # all, then the 2nd
    assert sorted(packet[1] for packet in world.channel.sent) == sorted(set(serials))


def test_a_batchs_load_accounts_are_read_in_one_query(wallet: Wallet) -> None:
    serials = ["1000000000000001", "1000000000000002"]

    def load(session, serial: str, order: int) -> None:  # type: ignore[no-untyped-def]
        _load(session, serial, f"topup_loaded:{order}")

    with wallet.database.transaction() as session:
        for order, serial in enumerate(serials):
            load(session, serial, order)  # the accounts exist from now on
    with wallet.database.transaction() as session, statements(wallet) as seen:
        topups.ready_for_proofs(SimpleNamespace(session=session), set(serials))
        for order, serial in enumerate(serials, start=2):
            load(session, serial, order)
    assert sum("FROM accounts WHERE accounts.code IN" in s for s in seen) == 1
    with wallet.database.transaction() as session:
        for serial in serials:
            account = session.scalar(select(Account).where(Account.code == f"card_float:{serial}"))
            assert ledger.balance(account) == 200


def test_proofs_find_their_orders_among_those_locked_ahead(wallet: Wallet, tmp_path: Path) -> None:
    """``ready_for_proofs`` locks the cards' sending orders at once; each proof then finds
    its order as its own query would: a second copy of a proof, its order moved on, is
    stale, and the load is posted once."""
    world = World(wallet, tmp_path)
    reference = world.order()
    world.pay(reference)
    assert world.work() == "packet 1 sent"

    def answered_twice(ctx, packet, answer):  # type: ignore[no-untyped-def]
        topups.ready_for_proofs(ctx, {world.serial})
        with statements(wallet) as seen:
            outcomes = [
                topups.on_proof_of_receipt(ctx, world.channel, packet[1], packet[2], answer)
                for _ in range(2)
            ]
        at_step = [s for s in seen if "FROM topup_orders" in s and "topup_orders.state IN" in s]
        assert not at_step  # (the stale copy asks only whether a settled load is proven)
        return outcomes

    for expected in ("packet 2 sent", "loaded"):
        packet = world.channel.sent[-1]
        answer = world.channel.run(packet)
        outcomes = world.run(lambda ctx, p=packet, a=answer: answered_twice(ctx, p, a))
        assert outcomes == [expected, "stale"]
    assert world.state(reference) == "loaded"
    assert world.books()[f"card_float:{world.serial}"] == 3000


def test_a_worker_tops_up_several_phones_in_shared_batches_once_each(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Three phones in lockstep, as bench.ota_worker runs them: each pass's SMS, callbacks
    and packets are one batch for all three (the batch paths: callbacks' orders locked at
    once, proofs' orders and accounts read ahead). Each top-up loads once, the books agree."""
    secret = new_webhook_secret()
    wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    bank = Bank(tmp_path / "bank.sqlite", clock=_real_now)
    bank.open_card(ota_worker.BANK_CARD, "Li Lei", 100_000)
    bank.add_merchant("BUSCARD", "http://platform/api/v1/bank/webhooks")
    centre, perso = SmsCentre(), Path(wallet.app.config["PERSONALIZATION_DIR"])
    phones = ota_worker.issue_phones(wallet.app, centre, bank, 3, perso)
    worker = Worker(wallet.app, InProcessGateway(centre, ota_worker.SHORT_CODE), bank)
    post = ota_worker.webhooks_to(wallet.app)
    with statements(wallet) as seen:
        for _ in range(2):
            ota_worker.lockstep_round(phones.values(), worker, bank, secret, post)
    assert any("topup_orders.card_serial IN" in s for s in seen)  # proofs read ahead
    books = wallet.ok("GET", "/api/v1/ledger")
    assert books["balanced"]
    floats = {a["code"]: a["credits_fen"] - a["debits_fen"] for a in books["accounts"]}
    for serial, phone in phones.items():
        assert purse(phone.sim).balance == 200 == floats[f"card_float:{serial}"]
    with wallet.database.transaction() as session:
        states = session.scalars(select(TopUpOrder.state)).all()
    assert states == ["loaded"] * 6


def _audited_actions(wallet: Wallet) -> list[str]:
    with wallet.database.transaction() as session:
        return session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()


def test_audit_events_go_with_the_savepoint_they_were_recorded_in(wallet: Wallet) -> None:
    before = _audited_actions(wallet)
    with wallet.database.transaction() as session:

        def record(action: str) -> None:
            audit.record(session, "test", action, "subject", wallet.clock())

        record("kept.1")
        rolled_back = session.begin_nested()
        record("dropped.1")
        rolled_back.rollback()
        released = session.begin_nested()
        record("kept.2")
        released.commit()
        parent = session.begin_nested()
        child = session.begin_nested()
        record("dropped.2")
        child.commit()  # released, then rolled back with its parent
        parent.rollback()
        record("kept.3")
        outer = session.begin_nested()
        inner = session.begin_nested()
        inner.commit()
        outer.rollback()  # nothing recorded in it: kept.3 stays
        try:
            with session.begin_nested():
                record("dropped.4")
                session.add(Account(code="bad", kind="x", debits_fen=-1, credits_fen=0))
                session.flush()  # the CHECK constraint refuses it: the savepoint rolls back
        except IntegrityError:
            pass
    with pytest.raises(RuntimeError), wallet.database.transaction() as session:
        audit.record(session, "test", "dropped.3", "subject", wallet.clock())
        raise RuntimeError("the transaction fails")
    # (one recorded inside a savepoint is inserted at once, the others as the transaction
    # commits: ids order transactions, not the events within one)
    assert sorted(_audited_actions(wallet)[len(before) :]) == ["kept.1", "kept.2", "kept.3"]


def test_transfers_and_audit_events_are_inserted_as_their_transaction_commits(
    wallet: Wallet,
) -> None:
    """Nothing reads them back inside their transaction: each table's rows go in one
    statement as it commits, not one round trip each. One made inside a savepoint goes at
    once (a failure is then the savepoint's); a rolled-back transaction's never go."""

    def inserts(seen: list[str], table: str) -> int:
        return sum(s.startswith(f"INSERT INTO {table} ") for s in seen)

    def counts() -> tuple[int, int]:
        with wallet.database.transaction() as session:
            return tuple(  # type: ignore[return-value]
                session.scalar(select(func.count()).select_from(model))
                for model in (Transfer, AuditEvent)
            )

    transfers_before, events_before = counts()
    with statements(wallet) as seen, wallet.database.transaction() as session:
        for n in range(3):
            _pay_in(session, 10, f"paid:{n}")
            audit.record(session, "test", f"held.{n}", "subject", AT)
        assert inserts(seen, "transfers") == inserts(seen, "audit_events") == 0
        ledger.check_balanced(session)  # (the transfers held count, as their totals do)
        with session.begin_nested():
            audit.record(session, "test", "in a savepoint", "subject", AT)
            assert inserts(seen, "audit_events") == 1
    assert inserts(seen, "transfers") == 1 and inserts(seen, "audit_events") == 2
    assert counts() == (transfers_before + 3, events_before + 4)
    with (
        statements(wallet) as seen,
        pytest.raises(RuntimeError),
        wallet.database.transaction() as session,
    ):
        _pay_in(session, 10, "paid:rolled back")
        audit.record(session, "test", "rolled back", "subject", AT)
        raise RuntimeError("the worker dies")
    assert inserts(seen, "transfers") == inserts(seen, "audit_events") == 0
    assert counts() == (transfers_before + 3, events_before + 4)
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]


def _passes_in(
    seconds: float, done_per_pass: int, listening: bool, wake_during_passes: int = 0
) -> int:
    """How many passes ``_repeat`` runs in ``seconds`` (idle 200 ms), each pass reporting
    ``done_per_pass`` units of work; the first ``wake_during_passes`` passes are woken
    during the pass (a NOTIFY while it ran)."""
    import threading

    from wallet_service.worker import _repeat

    stop, woken, listened = threading.Event(), threading.Event(), threading.Event()
    if listening:
        listened.set()
    passes: list[float] = []

    def unit() -> int:
        passes.append(time.monotonic())
        if len(passes) <= wake_during_passes:
            woken.set()
        return done_per_pass

    loop = threading.Thread(target=_repeat, args=(stop, unit, 200, woken, listened))
    loop.start()
    time.sleep(seconds)
    stop.set()
    woken.set()
    loop.join(timeout=5)
    return len(passes)


def test_while_listening_a_pass_that_did_work_waits_for_a_wake_up_not_a_second_look() -> None:
    """A pass that did work used to be followed by one at once, and under load that one
    found nothing more than a third of the time; with LISTEN in place, what comes after it
    wakes the loop."""
    assert _passes_in(0.5, done_per_pass=1, listening=True) <= 4  # one per 200 ms idle
    assert _passes_in(0.5, done_per_pass=1, listening=True, wake_during_passes=5) >= 6
    # Not listening (no PostgreSQL, or its LISTEN connection lost): nothing would wake it.
    assert _passes_in(0.5, done_per_pass=1, listening=False) > 20
    assert _passes_in(0.5, done_per_pass=0, listening=False) <= 4


def test_the_listener_says_while_it_listens_and_wakes_the_loop_as_it_starts(
    pg_wallet: Wallet,
) -> None:
    """(Whatever was stored while no one listened is looked for once LISTEN is in place.)"""
    import threading

    from wallet_service.services.bank_webhooks import WORK_CHANNEL
    from wallet_service.worker import _listen_for_work

    stop, woken, listening = threading.Event(), threading.Event(), threading.Event()
    listener = _listen_for_work(pg_wallet.app, woken, stop, listening)
    assert listener is not None
    try:
        assert listening.wait(10) and woken.wait(10)
        woken.clear()
        with pg_wallet.database.engine.connect() as connection:
            connection.exec_driver_sql(f"NOTIFY {WORK_CHANNEL}")
            connection.commit()
        assert woken.wait(10)
    finally:
        stop.set()
        listener.join(timeout=10)
    assert not listening.is_set()
