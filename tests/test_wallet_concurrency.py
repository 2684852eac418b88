"""Concurrency on PostgreSQL (the production database): many threads, one truth."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import func, select

from reader_sim.link import InMemoryLink, exchange
from sim_applet.sim import Sim
from sim_applet.structures import (
    SFI_PUBLIC,
    TRANSIT_AID,
    InitializeRequest,
    initialize_for_load,
    read_binary,
    select_by_aid,
)
from tests.test_wallet_pos_api import bus_with_fares
from tests.wallet_fixtures import Wallet, set_up_bus_company
from wallet_service.models import CounterLoad, TapRecord, Transfer

THREADS = 8


def test_the_same_batch_uploaded_by_many_threads_is_stored_once(
    pg_wallet: Wallet, tmp_path
) -> None:
    company = set_up_bus_company(pg_wallet)
    pos, _ = bus_with_fares(company, 20, tmp_path)
    records = [r.to_json() for r in pos.store.records()]
    pos.store.close()

    def upload(_: int):  # type: ignore[no-untyped-def]
        return pg_wallet.call(
            "POST", "/api/v1/pos/records", company.pos_token, {"records": records}
        )

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(upload, range(THREADS)))

    assert all(code == 200 for code, _ in answers), answers
    accepted = sorted(seq for _, answer in answers for seq in answer["accepted"])
    assert accepted == list(range(1, 21))  # each record accepted by exactly one upload
    with pg_wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(TapRecord)) == 20


def test_concurrent_retries_of_one_idempotent_load_authorize_once(pg_wallet: Wallet) -> None:
    company = set_up_bus_company(pg_wallet)
    token = company.counter_token
    card = pg_wallet.ok(
        "POST", "/api/v1/cards", token, {"iccid": "8986001234567890123", "phone": "13800138000"}
    )
    pg_wallet.ok("POST", f"/api/v1/cards/{card['serial']}/activate", token)
    sim = Sim.load(Path(pg_wallet.app.config["PERSONALIZATION_DIR"]) / card["image_file"])
    link = InMemoryLink(sim)
    exchange(link, select_by_aid(TRANSIT_AID))
    exchange(link, read_binary(SFI_PUBLIC, 0, 30))
    request = InitializeRequest(1, 500, bytes.fromhex("0000000000C1"))
    init, _ = exchange(link, initialize_for_load(request))
    body = {
        "card_serial": card["serial"],
        "amount_fen": 500,
        "terminal_id": "0000000000C1",
        "init_response": init.hex(),
    }

    def authorize(_: int):  # type: ignore[no-untyped-def]
        return pg_wallet.call("POST", "/api/v1/counter/loads", token, body, key="same-key")

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(authorize, range(THREADS)))

    assert {code for code, _ in answers} == {201}
    assert len({json.dumps(answer, sort_keys=True) for _, answer in answers}) == 1
    with pg_wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(CounterLoad)) == 1


def test_concurrent_confirmations_post_a_load_once(pg_wallet: Wallet) -> None:
    from reader_sim.counter_terminal import CounterTerminal
    from reader_sim.platform_client import PlatformClient
    from tests.wallet_fixtures import FlaskTransport

    company = set_up_bus_company(pg_wallet)
    token = company.counter_token
    card = pg_wallet.ok(
        "POST", "/api/v1/cards", token, {"iccid": "8986001234567890123", "phone": "13800138000"}
    )
    pg_wallet.ok("POST", f"/api/v1/cards/{card['serial']}/activate", token)
    sim = Sim.load(Path(pg_wallet.app.config["PERSONALIZATION_DIR"]) / card["image_file"])
    CounterTerminal(
        PlatformClient(FlaskTransport(pg_wallet), token), bytes.fromhex("0000000000C1")
    ).load(InMemoryLink(sim), 700)
    with pg_wallet.database.transaction() as session:
        load = session.scalars(select(CounterLoad)).one()
    confirm = {"tac": load.tac}

    def again(i: int):  # type: ignore[no-untyped-def]
        path = f"/api/v1/counter/loads/{load.id}/confirm"
        return pg_wallet.call("POST", path, token, confirm, key=f"confirm-again-{i}")

    with ThreadPoolExecutor(THREADS) as pool:
        codes = {code for code, _ in pool.map(again, range(THREADS))}
    assert codes == {200}
    with pg_wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Transfer)) == 1
    assert pg_wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_concurrent_postings_on_one_account_all_count(pg_wallet: Wallet) -> None:
    """Many transfers into one hot account at once (the platform's pooled accounts see
    every top-up): none may overwrite another's total."""
    from datetime import datetime

    from wallet_service import ledger
    from wallet_service.models import Account

    postings_per_thread = 25

    def post_many(thread: int) -> None:
        for n in range(postings_per_thread):
            with pg_wallet.database.transaction() as session:
                ledger.post(
                    session,
                    debit=ledger.open_account(session, ledger.HALL_CASH, f"H{thread}"),
                    credit=ledger.open_account(session, ledger.CARD_FLOAT, "HOT"),
                    amount_fen=n + 1,
                    kind="test",
                    reference=f"hot:{thread}:{n}",
                    at=datetime(2026, 11, 25),
                )

    for thread in range(THREADS):  # the accounts exist first: only the totals race
        with pg_wallet.database.transaction() as session:
            ledger.open_account(session, ledger.HALL_CASH, f"H{thread}")
    with pg_wallet.database.transaction() as session:
        ledger.open_account(session, ledger.CARD_FLOAT, "HOT")
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(post_many, range(THREADS)))
    expected = THREADS * postings_per_thread * (postings_per_thread + 1) // 2
    with pg_wallet.database.transaction() as session:
        hot = session.scalars(select(Account).where(Account.code == "card_float:HOT")).one()
        assert (hot.credits_fen, hot.debits_fen) == (expected, 0)
    assert pg_wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_a_hot_account_posted_at_commit_is_not_locked_before_the_commit(
    pg_wallet: Wallet,
) -> None:
    """A worker's batch posts to topup_pending:platform early and commits late: another
    transaction posting to the same account meanwhile must not wait for it (it would, with
    the row locked from the first posting: lock_timeout turns the wait into an error)."""
    from datetime import datetime

    from sqlalchemy import text

    from wallet_service import ledger
    from wallet_service.models import Account

    def pay_in(session, reference: str) -> None:  # type: ignore[no-untyped-def]
        ledger.post_at_commit(
            session,
            debit=(ledger.BANK_SETTLEMENT, "bank"),
            credit=("topup_pending", "platform"),
            amount_fen=100,
            kind="topup_paid",
            reference=reference,
            at=datetime(2026, 11, 25),
        )

    with pg_wallet.database.transaction() as session:  # the accounts exist first
        pay_in(session, "first")
    with pg_wallet.database.transaction() as long_batch:
        pay_in(long_batch, "early in a long batch")
        with pg_wallet.database.transaction() as meanwhile:
            meanwhile.execute(text("SET LOCAL lock_timeout = '2s'"))
            pay_in(meanwhile, "meanwhile")
    with pg_wallet.database.transaction() as session:
        pending = session.scalars(
            select(Account).where(Account.code == "topup_pending:platform")
        ).one()
        assert pending.credits_fen == 300
    assert pg_wallet.ok("GET", "/api/v1/ledger")["balanced"]


def test_two_workers_holding_two_orders_of_one_card_decide_one_after_the_other(
    pg_wallet: Wallet, tmp_path: Path
) -> None:
    """Worker 2 sends order B's packet 1 and has not committed; order A of the same card
    gets paid and worker 1 claims it. Worker 1 must wait for worker 2's commit and then see
    B under way — a lock taken in the same statement as the look would read B as it was
    before (READ COMMITTED), and two loads would go to one SIM at once."""
    import threading

    from tests.test_wallet_topups import World
    from wallet_service.services import topups

    world = World(pg_wallet, tmp_path)
    first, second = world.order(1000), world.order(2000)
    world.pay(second, 2000)
    context = world.context

    worker_2 = pg_wallet.database._sessions()
    worker_2.begin()
    assert [r.action for r in topups.work_batch(context(worker_2), world.channel, world.bank)] == [
        "packet 1 sent"
    ]
    world.pay(first, 1000)
    seen: list[str] = []

    def worker_1() -> None:
        with pg_wallet.database.transaction() as session:
            batch = topups.work_batch(context(session), world.channel, world.bank)
            seen.extend(result.action for result in batch)

    thread = threading.Thread(target=worker_1)
    thread.start()
    thread.join(timeout=1)
    assert thread.is_alive(), "worker 1 should wait for the card's lock"
    worker_2.commit()
    worker_2.close()
    thread.join(timeout=10)
    assert seen == ["waiting for the card's other top-up"]
    world.bank.close()


def test_one_bank_callback_delivered_by_many_threads_at_once_is_stored_once(
    pg_wallet: Wallet,
) -> None:
    """(The bank retrying while its first delivery is still being stored.)"""
    from datetime import datetime

    from reader_sim.bank import new_webhook_secret, signed_headers
    from wallet_service.models import BankWebhookEvent

    secret = new_webhook_secret()
    pg_wallet.app.config["BANK_WEBHOOK_SECRET"] = secret
    payload = json.dumps(
        {
            "type": "payment.succeeded",
            "data": {"order_id": "X-1", "payment_id": "pay_1", "amount_fen": 100},
        }
    )
    headers = signed_headers(secret, "msg_once", payload, datetime.now())

    def deliver(_: int):  # type: ignore[no-untyped-def]
        answer = pg_wallet.client().post("/api/v1/bank/webhooks", data=payload, headers=headers)
        return answer.status_code, answer.get_json()["duplicate"]

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(deliver, range(THREADS)))
    assert sorted(answers) == [(200, False)] + [(200, True)] * (THREADS - 1), answers
    with pg_wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(BankWebhookEvent)) == 1
