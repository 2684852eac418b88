"""Top-up faults a walk-through found: callbacks with unusable data, a bank that refuses or
cannot be reached for a refund, a card reported lost with an order paid, two active cards
on one phone, a payment of another amount. Each changes nothing it should not, and blocks
no other order."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from reader_sim.bank import new_webhook_secret, signed_headers
from tests.bank_doubles import FlakyRefunds, RefusingBank
from tests.helpers import serving
from tests.test_wallet_topups import BANK_CARD, PHONE, World
from tests.wallet_fixtures import Wallet, set_up_bus_company
from wallet_service.models import BankWebhookEvent, TopUpOrder
from wallet_service.services import cards, topups


@pytest.fixture
def world(wallet: Wallet, tmp_path: Path):  # type: ignore[no-untyped-def]
    the_world = World(wallet, tmp_path)
    yield the_world
    the_world.bank.close()


def _signed_post(world: World, body: bytes, msg_id: str = "msg_test") -> tuple[int, dict]:
    headers = signed_headers(world.secret, msg_id, body.decode(), datetime.now())
    answer = world.wallet.client().post("/api/v1/bank/webhooks", data=body, headers=headers)
    return answer.status_code, answer.get_json()


def _stored_events(world: World) -> list[BankWebhookEvent]:
    with world.wallet.database.transaction() as session:
        return list(session.scalars(select(BankWebhookEvent)))


def _order(world: World, reference: str) -> TopUpOrder:
    with world.wallet.database.transaction() as session:
        return session.scalars(select(TopUpOrder).where(TopUpOrder.reference == reference)).one()


GOOD = {"order_id": "X-1", "payment_id": "pay_1", "amount_fen": 100}


@pytest.mark.parametrize(
    "data",
    [
        None,
        {**GOOD, "amount_fen": "abc"},
        {**GOOD, "amount_fen": -100},
        {**GOOD, "amount_fen": 0},
        {**GOOD, "amount_fen": 1.5},
        {**GOOD, "amount_fen": 1e30},
        {**GOOD, "amount_fen": True},
        {k: v for k, v in GOOD.items() if k != "payment_id"},
        {**GOOD, "order_id": ""},
        {**GOOD, "order_id": 7},
        {**GOOD, "order_id": "X" * 101},
        {**GOOD, "payment_id": "P" * 41},
        {**GOOD, "paid_at": "yesterday"},
        {**GOOD, "paid_at": 1764496800},
    ],
)
def test_a_signed_callback_with_unusable_data_is_refused_and_not_stored(
    world: World, data: object
) -> None:
    """Checked before it is acknowledged: the bank retries, or someone looks — stored, it
    once stopped every later callback from being applied."""
    payload = (
        {"type": "payment.succeeded"}
        if data is None
        else {"type": "payment.succeeded", "data": data}
    )
    code, answer = _signed_post(world, json.dumps(payload).encode())
    assert code == 422, answer
    assert answer["error"]["code"] == "invalid_input"
    assert _stored_events(world) == []


def test_a_signed_body_that_is_not_json_is_bad_input_not_a_bad_signature(world: World) -> None:
    code, answer = _signed_post(world, b"{not json")
    assert code == 422 and "JSON" in answer["error"]["message"], answer
    assert _stored_events(world) == []
    stamp = str(int(time.time()))
    headers = {"webhook-id": "msg_x", "webhook-timestamp": stamp, "webhook-signature": "v1,AA=="}
    latin = world.wallet.client().post("/api/v1/bank/webhooks", data=b"\xff{}", headers=headers)
    assert latin.status_code == 422 and "UTF-8" in latin.get_json()["error"]["message"]
    assert _stored_events(world) == []


def test_an_unusable_stored_callback_is_set_aside_and_the_others_apply(world: World) -> None:
    """One stored before callbacks were checked (or by a bug): audited and set aside."""
    with world.wallet.database.transaction() as session:
        session.add(
            BankWebhookEvent(
                id="msg_unusable",
                event_type="payment.succeeded",
                payload=json.dumps({"type": "payment.succeeded", "data": {"amount_fen": "abc"}}),
                received_at=world.wallet.clock() - timedelta(minutes=1),
                processed_at=None,
            )
        )
    reference = world.order()
    world.pay(reference)  # applies the stored callbacks, oldest first
    assert world.state(reference) == "paid"
    assert all(event.processed_at is not None for event in _stored_events(world))
    assert world.wallet.audited("bank_callback.unusable")[0]["reason"].startswith("data.order_id")


def _store_payment_for_unknown_order(world: World) -> None:
    payload = {"type": "payment.succeeded", "data": {**GOOD, "order_id": "NOBODY-1"}}
    with world.wallet.database.transaction() as session:
        session.add(
            BankWebhookEvent(
                id="msg_unknown_order",
                event_type="payment.succeeded",
                payload=json.dumps(payload),
                received_at=world.wallet.clock() - timedelta(minutes=1),
                processed_at=None,
            )
        )


def _paid_at_bank(world: World, reference: str, amount: int = 3000) -> None:
    """Paid, and the bank's callback stored (not yet applied)."""
    world.bank.pay("BUSCARD", reference, amount, BANK_CARD)
    world.deliver_callbacks()


def test_money_for_an_unknown_order_goes_back_in_a_step_of_its_own(world: World) -> None:
    """The callback is applied without asking the bank (a bank that cannot be asked used
    to keep such a callback first in line every pass: a batch of them stopped every later
    payment from being applied, and every pass asked the bank again)."""
    world.bank.pay("BUSCARD", "NOBODY-1", 100, BANK_CARD)
    reference = world.order()
    _paid_at_bank(world, reference)
    assert world.run(lambda ctx: topups.process_bank_events(ctx)) == 2
    assert world.state(reference) == "paid"
    assert all(event.processed_at is not None for event in _stored_events(world))
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 100 - 3000
    down = RefusingBank(requests.ConnectionError("connection refused"))
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, down)) == (
        "refund: the bank could not be asked"
    )
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, world.bank)) is None
    world.later(topups.refund_retry_s)
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, world.bank)) == (
        "refunded"
    )
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, world.bank)) is None
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 3000
    [refunded] = world.wallet.audited("topup.unknown_payment_refunded")
    assert refunded["amount_fen"] == 100
    assert world.books().get("topup_pending:platform") == 3000  # (not the platform's money)


def test_money_for_an_unknown_order_the_bank_will_not_refund_waits_for_a_person(
    world: World,
) -> None:
    _store_payment_for_unknown_order(world)
    assert world.run(lambda ctx: topups.process_bank_events(ctx)) == 1
    refusing = RefusingBank(topups.RefundRefused("HTTP 422: unknown payment"))
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, refusing)) == (
        "refund refused by the bank"
    )
    assert world.wallet.audited("topup.refund_refused")[0]["reason"] == "HTTP 422: unknown payment"
    world.later(topups.refund_retry_s)
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, refusing)) is None
    world.later(topups.refund_refused_retry_s)
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, refusing)) is not None
    assert refusing.asked == 2


def test_a_refund_the_bank_cannot_do_now_waits_and_the_others_go_on(world: World) -> None:
    first, second = world.order(amount=2000), world.order(amount=1000)
    world.pay(first, amount=2500)  # another amount: to be refunded
    world.later(1)
    world.pay(second, amount=1500)
    assert world.state(first) == world.state(second) == "refunding"
    down = RefusingBank(requests.ConnectionError("connection refused"))
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, down)).action == (
        "refund: the bank could not be asked"
    )
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, world.bank)).action == (
        "refunded"
    )
    assert (world.state(first), world.state(second)) == ("refunding", "refunded")
    refused = RefusingBank(topups.RefundRefused("HTTP 409: more than was paid"))
    world.later(topups.refund_retry_s)
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, refused)).action == (
        "refund refused by the bank"
    )
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, world.bank)) is None
    assert (
        world.wallet.audited("topup.refund_refused")[0]["reason"] == "HTTP 409: more than was paid"
    )
    world.later(topups.refund_refused_retry_s)
    assert world.work() == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0


def test_a_payment_of_another_amount_keeps_the_amount_asked_and_refunds_what_was_paid(
    world: World,
) -> None:
    """The order keeps what the passenger asked (reconciliation shows the mismatch)."""
    reference = world.order(amount=3000)
    world.pay(reference, amount=2000)
    order = _order(world, reference)
    assert (order.amount_fen, order.paid_fen, order.state) == (3000, 2000, "refunding")
    [payment] = world.bank.statement("BUSCARD", order.paid_at.date()).splitlines()[1:]
    assert payment.endswith(order.paid_at.isoformat())  # the bank's time: its business day
    assert world.work() == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0
    assert world.channel.notices[-1][1].endswith("Refunded 20.00")


def test_a_paid_order_of_a_card_reported_lost_is_refunded_not_loaded(world: World) -> None:
    reference = world.order()
    world.run(lambda ctx: cards.mark_lost(ctx, cards.card_by_serial(ctx, world.serial), "phone"))
    world.pay(reference)
    assert world.work() == "giving up"
    assert world.work() == "refunded"
    assert world.channel.sent == []  # no packet went to the lost card's phone
    assert _order(world, reference).failure == "the card is lost"
    assert world.bank.card_balance(BANK_CARD) == 100_000


def test_a_lost_card_s_order_waiting_for_packet_1_s_answer_is_refunded(world: World) -> None:
    reference = world.order()
    world.pay(reference)
    assert world.work() == "packet 1 sent"
    world.run(lambda ctx: cards.mark_lost(ctx, cards.card_by_serial(ctx, world.serial), "phone"))
    world.later(topups.por_timeout_s)
    assert world.work() == "giving up"
    assert world.work() == "refunded"
    assert len(world.channel.sent) == 1


def test_a_phone_has_one_active_card(wallet: Wallet) -> None:
    """A phone's SMS name its card by the number: two active cards on one number sent one
    card's PoRs to the other's orders (and its refund notice to the other's phone)."""
    company = set_up_bus_company(wallet)
    token = company.counter_token
    first, second = (
        wallet.ok("POST", "/api/v1/cards", token, {"iccid": iccid, "phone": PHONE})
        for iccid in ("8986001234567890123", "8986001234567890124")
    )
    wallet.ok("POST", f"/api/v1/cards/{first['serial']}/activate", token)
    code, answer = wallet.call("POST", f"/api/v1/cards/{second['serial']}/activate", token)
    assert code == 409 and first["serial"] in answer["error"]["message"], answer
    assert wallet.ok("GET", f"/api/v1/cards/{second['serial']}", token)["status"] == "issued"


def test_the_database_keeps_one_active_card_per_phone(wallet: Wallet) -> None:
    """(Two activations at once: the index stops the second; its retry gets the 409.)"""
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    from wallet_service.models import Card

    company = set_up_bus_company(wallet)
    for iccid in ("8986001234567890123", "8986001234567890124"):
        wallet.ok("POST", "/api/v1/cards", company.counter_token, {"iccid": iccid, "phone": PHONE})
    with pytest.raises(IntegrityError), wallet.database.transaction() as session:
        session.execute(update(Card).values(status="active"))


def test_a_refund_whose_answer_was_lost_is_posted_once_when_the_bank_confirms_it(
    world: World,
) -> None:
    """The bank's refund.succeeded comes before the step's retry: the step runs at once,
    gets the same refund under the same key, posts it and tells the passenger (the callback
    used to mark the order refunded with nothing posted: 25 yuan stuck in the books)."""
    reference = world.order(amount=3000)
    world.pay(reference, amount=2500)
    lost = FlakyRefunds(world.bank, failures=[True])  # done at the bank, the answer lost
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, lost)).action == (
        "refund: the bank could not be asked"
    )
    world.pay_callbacks()  # the bank's refund.succeeded, applied
    assert world.work() == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0
    assert world.channel.notices[-1][1].endswith("Refunded 25.00")
    assert world.work() is None  # once


@pytest.mark.parametrize(
    ("status", "retry_after", "raised", "wait_s"),
    [
        (409, None, topups.RefundRefused, None),
        (422, None, topups.RefundRefused, None),
        (401, None, topups.BankBusy, None),  # the signature refused: the platform's set-up
        (429, None, topups.BankBusy, None),
        (429, "120", topups.BankBusy, 120),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", topups.BankBusy, 0),  # (a date gone by)
        (503, "soon", topups.BankBusy, None),
        (408, None, topups.BankBusy, None),
        (500, None, requests.HTTPError, None),
    ],
)
def test_the_platform_takes_a_bank_s_4xx_as_no_but_busy_answers_as_later(
    status: int, retry_after: str | None, raised: type, wait_s: float | None
) -> None:
    from http.server import BaseHTTPRequestHandler

    from wallet_service.worker import HttpBankClient

    class Bank(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    with serving(Bank) as bank:
        client = HttpBankClient(bank, new_webhook_secret())
        with pytest.raises(raised) as error:
            client.refund("pay_1", 100, "test", "key-1")
        if raised is topups.BankBusy:
            assert error.value.retry_after_s == wait_s


def test_a_retry_after_in_an_http_date_counts_from_now() -> None:
    from wallet_service.worker import retry_after_s

    now = 1_764_547_200.0  # 2025-12-01 00:00:00 UTC
    assert retry_after_s("Mon, 01 Dec 2025 00:05:00 GMT", now) == 300
    assert retry_after_s(" 90 ", now) == 90
    assert retry_after_s("Mon, 01 Dec 2025 00:05:00 -0000", now) is None  # no zone
    assert retry_after_s("-5", now) is None and retry_after_s(None, now) is None


def test_a_busy_bank_is_asked_again_when_it_said(world: World) -> None:
    """Its Retry-After, not the minute the platform waits when the bank cannot be reached
    (and at most an hour, whatever it says)."""
    reference = world.order(amount=2000)
    world.pay(reference, amount=2500)  # another amount: to be refunded
    busy = RefusingBank(topups.BankBusy("HTTP 429", retry_after_s=900))
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, busy)).action == (
        topups.BANK_NOT_ASKED
    )
    world.later(topups.refund_retry_s)
    assert world.run(lambda ctx: topups.refund_once(ctx, world.channel, world.bank)) is None
    world.later(900 - topups.refund_retry_s)
    assert world.work() == "refunded"
    second = world.order(amount=2000)
    world.pay(second, amount=2500)
    forever = RefusingBank(topups.BankBusy("HTTP 503", retry_after_s=10**9))
    world.run(lambda ctx: topups.refund_once(ctx, world.channel, forever))
    world.later(topups.refund_retry_after_s_max)
    assert world.work() == "refunded"


def test_a_second_payment_of_a_paid_order_goes_back(world: World) -> None:
    """A bank that took the order twice (here: its order ids are case-sensitive, the
    platform's not): the second payment used to be taken for the first told again —
    neither posted nor refunded, kept by the bank."""
    reference = world.order()
    world.pay(reference)
    world.pay(reference.lower())
    while world.work() is not None:
        pass
    assert world.run(lambda ctx: topups.refund_unknown_payment_once(ctx, world.bank)) == (
        "refunded"
    )
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 3000  # one kept, one back
    assert world.books()["topup_pending:platform"] == 3000  # the first, still loading
    assert world.wallet.audited("topup.second_payment")[0]["amount_fen"] == 3000


def test_without_the_bank_secret_a_refund_waits_and_asks_nothing() -> None:
    """(The bank takes signed requests only: unsigned, it would say no, and the refund
    would wait for a person; the secret may yet be set.)"""
    from wallet_service.worker import HttpBankClient, NoBankSecret

    client = HttpBankClient("http://127.0.0.1:9", None)  # (nothing listens: never asked)
    with pytest.raises(topups.BankBusy, match="WALLET_BANK_WEBHOOK_SECRET"):
        client.refund("pay_1", 100, "test", "key-1")
    with pytest.raises(NoBankSecret):
        client.statement("BUSCARD", datetime(2026, 12, 1).date())
