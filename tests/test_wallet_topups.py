"""Over-the-air top-up orders: every paid order ends loaded exactly once or refunded.

The OTA channel here is in memory (a fake for one layer: APDUs run straight on the SIM
model; the secured-packet channel is tested with ``otar``); the bank is the simulated one,
its callbacks signed and delivered to the platform's webhook endpoint."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import pytest

from reader_sim.bank import Bank, deliver_due, new_webhook_secret
from reader_sim.link import InMemoryLink
from reader_sim.pos import Outcome
from sim_applet.personalize import IssuerKeys, personalize
from sim_applet.sim import Sim
from tests.helpers import new_pos, purse
from tests.test_wallet_cards_and_loads import issue_card
from tests.wallet_fixtures import Wallet, listening_for_work, set_up_bus_company
from wallet_service.auth import Principal
from wallet_service.services import topups
from wallet_service.services.registry import Context

BANK_CARD = "6222020000000001"
PHONE = "13800138000"


class MemoryChannel:
    """Packets wait in ``sent`` until the test delivers, loses or duplicates them."""

    def __init__(self, sims: dict[str, Sim]) -> None:
        self.sims = sims
        self.sent: list[tuple[str, str, int, list[bytes]]] = []
        self.notices: list[tuple[str, str]] = []

    def send(self, phone: str, card_serial: str, step: int, apdus: list[bytes]) -> None:
        self.sent.append((phone, card_serial, step, apdus))

    def notify(self, phone: str, text: str) -> None:
        self.notices.append((phone, text))

    def run(self, packet) -> bytes:  # type: ignore[no-untyped-def]
        phone, _, _, apdus = packet
        sim = self.sims[phone]
        answer = b""
        for apdu in apdus:
            answer = sim.transmit(apdu)
        return answer


class World:
    def __init__(self, wallet: Wallet, tmp_path: Path, sim_keys: IssuerKeys | None = None):
        self.wallet = wallet
        company = set_up_bus_company(wallet)
        card, self.sim = issue_card(wallet, company.counter_token, phone=PHONE)
        self.serial = card["serial"]
        if sim_keys is not None:  # a clone made with another issuer's keys
            self.sim = personalize(bytes.fromhex(self.serial), issuer=sim_keys)
        self.channel = MemoryChannel({PHONE: self.sim})
        self.secret = new_webhook_secret()
        wallet.app.config["BANK_WEBHOOK_SECRET"] = self.secret
        self.bank = Bank(tmp_path / "bank.sqlite", clock=_real_now)
        self.bank.open_card(BANK_CARD, "Li Lei", 100_000)
        self.bank.add_merchant("BUSCARD", "http://platform/api/v1/bank/webhooks")

    def context(self, session) -> Context:  # type: ignore[no-untyped-def]
        """The platform's, in ``session`` (a worker's, say)."""
        keys = self.wallet.app.config["KEY_STORE"]
        return Context(
            session, Principal(0, "admin"), self.wallet.clock(), keys, Path("/nonexistent")
        )

    def run(self, work):  # type: ignore[no-untyped-def]
        return self.wallet.database.run(lambda session: work(self.context(session)))

    def order(self, amount: int = 3000) -> str:
        request_id = secrets.token_bytes(4)
        order = self.run(
            lambda ctx: topups.create_order(ctx, self.serial, request_id, amount, PHONE)
        )
        return order.reference

    def pay(self, reference: str, amount: int = 3000) -> None:
        self.bank.pay("BUSCARD", reference, amount, BANK_CARD)
        self.pay_callbacks()

    def pay_callbacks(self) -> None:
        """The bank's due callbacks delivered to the platform, and applied."""
        self.deliver_callbacks()
        self.run(lambda ctx: topups.process_bank_events(ctx))

    def deliver_callbacks(self) -> None:
        """The bank's due callbacks delivered to the platform's webhook endpoint."""

        def post(url: str, payload: str, headers: dict[str, str]) -> int:
            answer = self.wallet.client().post(
                "/api/v1/bank/webhooks", data=payload, headers=headers
            )
            return answer.status_code

        deliver_due(self.bank, self.secret, post)

    def work(self) -> str | None:
        result = self.run(lambda ctx: topups.work_once(ctx, self.channel, self.bank))
        return None if result is None else result.action

    def deliver(self, index: int = -1) -> str:
        packet = self.channel.sent[index]
        answer = self.channel.run(packet)
        return self.run(
            lambda ctx: topups.on_proof_of_receipt(ctx, self.channel, packet[1], packet[2], answer)
        )

    def later(self, seconds: int) -> None:
        self.wallet.clock.now += timedelta(seconds=seconds)

    def state(self, reference: str) -> str:
        from sqlalchemy import select

        from wallet_service.models import TopUpOrder

        with self.wallet.database.transaction() as session:
            return session.scalar(select(TopUpOrder.state).where(TopUpOrder.reference == reference))

    def books(self) -> dict[str, int]:
        answer = self.wallet.ok("GET", "/api/v1/ledger")
        assert answer["balanced"]
        return {a["code"]: a["credits_fen"] - a["debits_fen"] for a in answer["accounts"]}


def _real_now():  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.now().replace(microsecond=0)


@pytest.fixture
def world(wallet: Wallet, tmp_path: Path):  # type: ignore[no-untyped-def]
    the_world = World(wallet, tmp_path)
    yield the_world
    the_world.bank.close()


def test_a_paid_order_is_loaded_over_the_air_and_posted_once(world: World) -> None:
    reference = world.order()
    world.pay(reference)
    assert world.work() == "packet 1 sent"
    assert world.deliver() == "packet 2 sent"
    assert world.deliver() == "loaded"
    assert purse(world.sim).balance == 3000 and world.state(reference) == "loaded"
    books = world.books()
    assert books[f"card_float:{world.serial}"] == 3000
    assert books["topup_pending:platform"] == 0 and books["bank_settlement:bank"] == -3000
    assert world.work() is None


def test_a_lost_proof_of_receipt_after_credit_is_settled_by_transaction_prove(
    world: World,
) -> None:
    reference = world.order()
    world.pay(reference)
    world.work()
    world.deliver()  # packet 1 answered, packet 2 sent
    world.channel.run(world.channel.sent[-1])  # the card is credited … and the PoR is lost
    world.later(topups.por_timeout_s)
    assert world.work() == "packet 3 sent"
    assert world.deliver() == "loaded"
    assert purse(world.sim).balance == 3000
    assert world.books()[f"card_float:{world.serial}"] == 3000


def test_a_lost_credit_packet_is_proven_not_loaded_and_loaded_from_the_start(
    world: World,
) -> None:
    reference = world.order()
    world.pay(reference)
    world.work()
    world.deliver()  # packet 2 sent … and lost: the card never sees it
    world.later(topups.por_timeout_s)
    world.work()  # packet 3
    assert world.deliver() == "not loaded: again from packet 1"
    assert world.work() == "packet 1 sent"
    world.deliver()
    assert world.deliver() == "loaded"
    assert purse(world.sim).balance == 3000 and world.state(reference) == "loaded"


def test_a_tap_between_packet_1_and_2_cancels_the_load_which_then_restarts(
    world: World,
) -> None:
    world.sim.application("transit_purse").state.balance = 1000  # type: ignore[attr-defined]
    reference = world.order()
    world.pay(reference)
    world.work()
    world.deliver()  # packet 2 waits in the SMS centre …
    assert new_pos().present(InMemoryLink(world.sim)).outcome is Outcome.PAID
    assert world.deliver() == "credit refused: again from packet 1"
    world.work()
    world.deliver()
    assert world.deliver() == "loaded"
    assert purse(world.sim).balance == 1000 - 200 + 3000


def test_a_stale_or_duplicated_proof_of_receipt_changes_nothing(world: World) -> None:
    reference = world.order()
    world.pay(reference)
    world.work()
    world.later(topups.por_timeout_s)
    world.work()  # packet 1 resent: the first one is now stale
    assert world.deliver(0) == "stale"
    assert world.deliver(1) == "packet 2 sent"
    assert world.deliver() == "loaded"
    assert world.deliver() == "stale"  # the last PoR, duplicated
    assert purse(world.sim).balance == 3000


def test_an_unreachable_phone_ends_in_a_refund(world: World) -> None:
    reference = world.order()
    world.pay(reference)
    for _ in range(topups.init_attempts_max):
        assert world.work() == "packet 1 sent"
        world.later(topups.por_timeout_s)
    assert world.work() == "giving up"
    assert world.work() == "refunded"
    assert world.state(reference) == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0


def test_a_card_whose_mac1_fails_is_refunded(wallet: Wallet, tmp_path: Path) -> None:
    world = World(wallet, tmp_path, sim_keys=IssuerKeys(*(bytes([i]) * 16 for i in range(1, 6))))
    reference = world.order()
    world.pay(reference)
    world.work()
    assert world.deliver() == "mac1 invalid"
    assert world.work() == "refunded"
    assert purse(world.sim).balance == 0 and world.bank.card_balance(BANK_CARD) == 100_000
    world.bank.close()


def test_the_same_payment_told_twice_pays_once(world: World) -> None:
    import json

    from sqlalchemy import select

    from wallet_service.models import BankWebhookEvent

    reference = world.order()
    world.pay(reference)
    with world.wallet.database.transaction() as session:
        first = session.scalars(select(BankWebhookEvent)).one()
        session.add(
            BankWebhookEvent(
                id="msg_resent_with_a_new_id",
                event_type=first.event_type,
                payload=first.payload,
                received_at=first.received_at,
                processed_at=None,
            )
        )
    assert world.run(lambda ctx: topups.process_bank_events(ctx)) == 1
    assert world.books()["topup_pending:platform"] == 3000
    assert json.loads(first.payload)["data"]["order_id"] == reference


def test_a_payment_of_another_amount_is_refunded_in_full(world: World) -> None:
    reference = world.order(amount=2000)
    world.pay(reference, amount=2500)
    assert world.state(reference) == "refunding"
    assert world.work() == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0
    assert purse(world.sim).balance == 0


def test_a_payment_after_the_order_expired_goes_back_to_the_bank_card(world: World) -> None:
    """The bank does not know the order expired; the platform cannot load it any more, and
    must not keep the money (it used to ignore such a payment)."""
    reference = world.order(amount=2000)
    world.later(topups.order_lifetime_s + 1)
    assert world.work() == "expired"
    world.pay(reference, amount=2000)
    assert world.state(reference) == "refunding"  # the bank is called in a step of its own
    assert world.books()["topup_pending:platform"] == 2000
    assert world.work() == "refunded"
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0
    assert purse(world.sim).balance == 0


def test_only_the_card_in_ones_own_phone_can_be_topped_up(world: World) -> None:
    from wallet_service.errors import Conflict

    with pytest.raises(Conflict):
        world.run(
            lambda ctx: topups.create_order(
                ctx, world.serial, b"\x01\x02\x03\x04", 100, "13900000000"
            )
        )


def test_the_daily_three_way_match_finds_what_does_not_add_up(world: World) -> None:
    from datetime import date

    loaded = world.order(amount=3000)
    world.pay(loaded, amount=3000)
    world.work()
    world.deliver()
    world.deliver()
    stuck = world.order(amount=1000)
    world.pay(stuck, amount=1000)  # paid, the phone never answers yet
    statement = world.bank.statement("BUSCARD", date.today())
    forged = (
        statement + f"payment,pay_x,pay_x,{world.serial}-FFFFFFFF,500,{date.today()}T10:00:00\n"
    )

    report = world.wallet.ok(
        "POST", f"/api/v1/bank/reconciliation/{date.today()}", body={"statement_csv": forged}
    )

    assert report["bank_paid_fen"] == 4500 and report["loaded_fen"] == 3000
    kinds = {(f["kind"], f["order"]) for f in report["findings"]}
    assert kinds == {("paid_not_loaded", stuck), ("paid_unknown_order", f"{world.serial}-FFFFFFFF")}
    bad = world.wallet.call(
        "POST",
        f"/api/v1/bank/reconciliation/{date.today()}",
        body={"statement_csv": "not,a,statement\n"},
    )
    assert bad[0] == 422


def test_the_same_request_again_is_the_same_order_never_another_amount(world: World) -> None:
    from wallet_service.errors import Conflict

    request_id = b"\x0a\x0b\x0c\x0d"

    def create(amount: int) -> str:
        return world.run(
            lambda ctx: topups.create_order(ctx, world.serial, request_id, amount, PHONE).reference
        )

    first = create(3000)
    assert create(3000) == first
    with pytest.raises(Conflict):
        create(2000)
    assert [event["order"] for event in world.wallet.audited("topup.request")] == [first]


def test_a_request_told_twice_at_the_same_moment_makes_one_order(world: World) -> None:
    """The twin waits for the first's commit, then finds its order (no conflict raised)."""
    import threading

    request_id = b"\x01\x01\x01\x01"

    def create(ctx: Context) -> str:
        return topups.create_order(ctx, world.serial, request_id, 3000, PHONE).reference

    twin: list[str] = []
    with world.wallet.database.transaction() as session:
        first = create(Context.for_platform(session, world.wallet.app.config))
        thread = threading.Thread(target=lambda: twin.append(world.run(create)))
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # waiting for this transaction
    thread.join(timeout=30)
    assert twin == [first]


def test_a_load_to_start_again_wakes_the_workers_on_postgresql(
    pg_wallet: Wallet, tmp_path: Path
) -> None:
    """(Made due by a proof of receipt, not by a callback: without a NOTIFY, the due loop
    would send packet 1 again only at its next idle poll.)"""
    from wallet_service.services.bank_webhooks import WORK_CHANNEL

    world = World(pg_wallet, tmp_path)
    try:
        with listening_for_work(pg_wallet) as db:
            world.sim.application("transit_purse").state.balance = 1000  # type: ignore[attr-defined]
            reference = world.order()
            world.pay(reference)
            list(db.notifies(timeout=0.5))  # (the callback's)
            world.work()
            assert world.deliver() == "packet 2 sent"  # (a proof that makes nothing due)
            assert list(db.notifies(timeout=0.3)) == []
            assert new_pos().present(InMemoryLink(world.sim)).outcome is Outcome.PAID
            assert world.deliver() == "credit refused: again from packet 1"
            woke = list(db.notifies(timeout=2.0, stop_after=1))
            assert [notice.channel for notice in woke] == [WORK_CHANNEL]
    finally:
        world.bank.close()
