"""Every paid order ends loaded exactly once or refunded: random sequences of top-up
requests from two phones (two cards: their orders share the worker's batches, its outbox
and its reads of PoRs), payments in any order (and twice), payments for orders never made,
rekeys, a card reported lost, worker passes, lost and duplicated SMS every way, refunds
the bank fails (before doing them, or after, the answer lost) and time passing, over the
real secured packets, the SIM model and the bank.

After every step: the books balance, and each SIM holds what the platform counts as loaded
to its card plus at most what it may have loaded without knowing yet (orders whose CREDIT
went out). At the end, with the faults over and time let run: no order is left under way,
each SIM holds exactly its card's loaded orders, the bank card paid exactly those, nothing
is pending.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from reader_sim.phone import Phone, ScriptedScreen
from sim_applet.sim import Sim
from tests.bank_doubles import FlakyRefunds
from tests.helpers import purse
from tests.test_phone import BANK_CARD, PHONE, SHORT_CODE, PhoneWorld
from tests.test_wallet_cards_and_loads import issue_card
from tests.wallet_fixtures import _make_wallet, _truncate
from wallet_service.migrate import upgrade
from wallet_service.models import OtaRekey, TopUpOrder
from wallet_service.services import rekeys, topups
from wallet_service.sms_gateway import InProcessGateway
from wallet_service.worker import Worker, run_once

BANK_BALANCE_FEN = 100_000
AMOUNTS_YUAN = ("10", "20", "30")
WAITS_S = (topups.card_busy_wait_s, topups.por_timeout_s, 600, topups.order_lifetime_s + 1)
SETTLE_ROUNDS = 14  # proving backs off to an hour: enough rounds of an hour each
SECOND_PHONE = "13900000002"
HANDSETS = (0, 1)  # which passenger
MAY_HAVE_LOADED = ("credit_sent", "proving")  # its CREDIT went out, its PoR not back
_template: list[Path] = []


def _sqlite_template() -> Path:
    """One migrated database per test session, copied for each example."""
    if not _template:
        path = Path(tempfile.mkdtemp(prefix="topup-template-")) / "wallet.sqlite"
        upgrade(f"sqlite:///{path}")
        _template.append(path)
    return _template[0]


@dataclass
class Handset:
    """A passenger's phone and the card in its SIM."""

    serial: str
    sim: Sim
    phone: Phone
    screen: ScriptedScreen


class TopUpMachine(RuleBasedStateMachine):
    postgres_url: str | None = None  # (set: each example on this database, emptied first)

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="topups-"))
        if self.postgres_url is None:
            database = self.directory / "wallet.sqlite"
            shutil.copy(_sqlite_template(), database)
            self.wallet = _make_wallet(f"sqlite:///{database}", "sqlite", self.directory)
        else:
            _truncate(self.postgres_url)
            self.wallet = _make_wallet(self.postgres_url, "postgresql", self.directory)
        self.world = PhoneWorld(self.wallet, self.directory)
        self.handsets = [
            Handset(self.world.serial, self.world.sim, self.world.phone, self.world.screen),
            self._second_handset(),
        ]
        for handset in self.handsets:
            handset.phone.pay = None  # the passenger pays by rule, in any order
        self.paid: set[tuple[str, str, int]] = set()
        self.bank = FlakyRefunds(self.world.bank)  # the worker's bank
        self.payments_for_no_order = 0

    def _second_handset(self) -> Handset:
        card, sim = issue_card(
            self.wallet, self.wallet.admin_token, iccid="8986009999999999999", phone=SECOND_PHONE
        )
        screen = ScriptedScreen()
        line = InProcessGateway(self.world.smsc, SECOND_PHONE)
        phone = Phone(sim, SECOND_PHONE, line, screen, self.world.bank_app)
        phone.power_on()
        return Handset(card["serial"], sim, phone, screen)

    def _links(self) -> list[tuple[str, str, int]]:
        return [link for handset in self.handsets for link in handset.phone.payment_links]

    def teardown(self) -> None:
        try:
            self._settle()
            self._everything_ended_loaded_or_refunded()
        finally:
            self.world.bank.close()
            self.wallet.database.dispose()
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- what happens ----------------------------------------------------------------------

    @rule(amount=st.sampled_from(AMOUNTS_YUAN), which=st.sampled_from(HANDSETS))
    def request_a_top_up(self, amount: str, which: int = 0) -> None:
        handset = self.handsets[which]
        handset.screen.answers[:] = [amount, "123456"]
        handset.phone.select(4)

    @precondition(lambda self: self._links())
    @rule(data=st.data())
    def pay_a_link(self, data: st.DataObject) -> None:
        link = data.draw(st.sampled_from(self._links()))
        self.world.bank_app(*link)
        self.paid.add(link)

    @rule()
    def worker_pass(self) -> None:
        run_once(self.wallet.app, self.world.gateway, self.bank)

    @rule()
    def worker_loop_pass(self) -> None:
        """A pass as ``python app.py worker`` loops: the SMS read, then the due work —
        callbacks applied and their orders' packet 1 sent in one transaction, each order
        written once (``Worker.do_due_work``), refunds and rekeys after."""
        worker = Worker(self.wallet.app, self.world.gateway, self.bank)
        worker.rare_work_look_s = 0.0  # (looks for refunds every pass, not once a second)
        worker.read_sms(0)
        worker.do_due_work()

    @rule(after=st.booleans())
    def the_next_refund_fails(self, after: bool) -> None:
        """The bank cannot be reached — or does the refund and its answer is lost."""
        self.bank.failures.append(after)

    @rule()
    def the_banks_callbacks_arrive(self) -> None:
        self.world.deliver_callbacks()

    @precondition(lambda self: self.payments_for_no_order < 2)
    @rule()
    def a_payment_for_an_order_never_made(self) -> None:
        self.payments_for_no_order += 1
        self.world.bank_app("BUSCARD", f"NOBODY-{self.payments_for_no_order}", 100)

    @rule(which=st.sampled_from(HANDSETS))
    def the_passenger_reports_the_card_lost(self, which: int) -> None:
        """(Top-ups refused from then on; a CREDIT already sent still settles.)"""
        handset = self.handsets[which]
        handset.screen.answers[:] = ["123456"]
        handset.phone.select(5)

    @rule(which=st.sampled_from(HANDSETS))
    def phone_receives(self, which: int) -> None:
        self.handsets[which].phone.receive()

    @rule()
    def a_round_trip(self) -> None:
        """The worker, then the phones: what usually happens next."""
        self.worker_pass()
        for handset in self.handsets:
            handset.phone.receive()

    @rule(to=st.sampled_from((PHONE, SECOND_PHONE, SHORT_CODE)))
    def sms_lost(self, to: str) -> None:
        self.world.smsc.collect(to)

    @rule(to=st.sampled_from((PHONE, SECOND_PHONE, SHORT_CODE)))
    def sms_duplicated(self, to: str) -> None:
        """The next message waiting arrives twice (not the whole mailbox: that doubles
        it at every step)."""
        waiting = self.world.smsc.collect(to)
        for sms in waiting[:1] + waiting:
            self.world.smsc.submit(sms.sender, sms.recipient, sms.user_data, sms.udh)

    @rule(which=st.sampled_from(HANDSETS))
    def the_platform_rekeys_the_sim(self, which: int) -> None:
        """New OTA keys, between and during top-ups (refused while one is open)."""
        serial = self.handsets[which].serial
        status, _ = self.wallet.call("POST", f"/api/v1/cards/{serial}/ota-rekey")
        assert status in (202, 409)

    @rule(seconds=st.sampled_from(WAITS_S))
    def time_passes(self, seconds: int) -> None:
        self.world.later(seconds)

    # --- what must hold ----------------------------------------------------------------------

    def _orders(self) -> list[TopUpOrder]:
        with self.wallet.database.transaction() as session:
            return list(session.scalars(select(TopUpOrder).order_by(TopUpOrder.id)))

    @invariant()
    def each_sim_holds_what_was_loaded_and_at_most_what_may_have_been(self) -> None:
        """(And a card loads one order at a time: never two sending packets.)"""
        orders = self._orders()
        assert {o.card_serial for o in orders} <= {h.serial for h in self.handsets}
        books = self.world.books()  # asserts they balance
        for handset in self.handsets:
            own = [o for o in orders if o.card_serial == handset.serial]
            loaded = sum(o.amount_fen for o in own if o.state == "loaded")
            may_have_loaded = sum(o.amount_fen for o in own if o.state in MAY_HAVE_LOADED)
            sending = [o.reference for o in own if o.state in topups.SENDING_PACKETS]
            assert len(sending) <= 1, f"one load of a card at a time, not {sending}"
            assert books.get(f"card_float:{handset.serial}", 0) == loaded
            assert loaded <= purse(handset.sim).balance <= loaded + may_have_loaded

    def _settle(self) -> None:
        """The faults stop, time runs, and the passenger pays every link not paid yet —
        so every example ends with loads (or refunds, for links paid after they expired)
        on top of whatever the faults left."""
        for _ in range(SETTLE_ROUNDS):
            for _ in range(3):
                run_once(self.wallet.app, self.world.gateway, self.world.bank)
                for handset in self.handsets:
                    handset.phone.receive()
                self.world.deliver_callbacks()
                for link in self._links():
                    if link not in self.paid:
                        self.world.bank_app(*link)
                        self.paid.add(link)
            self.world.later(topups.prove_backoff_max_s)

    def _everything_ended_loaded_or_refunded(self) -> None:
        with self.wallet.database.transaction() as session:
            open_rekeys = session.scalars(
                select(OtaRekey.state).where(OtaRekey.state.in_(rekeys.OPEN))
            ).all()
        assert not open_rekeys
        orders = self._orders()
        assert not [o for o in orders if o.state in (*topups.IN_FLIGHT, "refunding")], [
            (o.state, o.attempts) for o in orders
        ]
        books = self.world.books()
        assert books.get("topup_pending:platform", 0) == 0
        for handset in self.handsets:
            loaded = sum(
                o.amount_fen
                for o in orders
                if o.state == "loaded" and o.card_serial == handset.serial
            )
            assert purse(handset.sim).balance == loaded
            assert books.get(f"card_float:{handset.serial}", 0) == loaded
        all_loaded = sum(o.amount_fen for o in orders if o.state == "loaded")
        assert self.world.bank.card_balance(BANK_CARD) == BANK_BALANCE_FEN - all_loaded


TopUpMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# 40 runs of 30 steps take 30–55 s, by the machine's speed: past the suite's 60 s timeout
# on a slow hour, so this test has a bound of its own.
TestTopUps = pytest.mark.timeout(300)(TopUpMachine.TestCase)


@pytest.mark.timeout(300)
def test_the_machine_on_postgresql(postgres_url: str) -> None:
    """The same rules on PostgreSQL: its row locks, its SKIP LOCKED, its pipelined commits
    and autocommitted callbacks, where SQLite serializes every transaction. Fewer runs:
    each statement is a round trip here."""

    class OnPostgres(TopUpMachine):
        pass

    OnPostgres.postgres_url = postgres_url
    run_state_machine_as_test(
        OnPostgres,
        settings=settings(
            max_examples=postgres_examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


postgres_examples = 15


def test_two_orders_paid_at_once_end_loaded_or_refunded() -> None:
    """The sequence that once left an order proving for ever (both packets 1 out before
    either CREDIT; the first CREDIT's counter below the second's packet 1)."""
    machine = TopUpMachine()
    machine.request_a_top_up("30")
    machine.request_a_top_up("20")
    machine.a_round_trip()
    for link in list(machine.world.phone.payment_links):
        machine.world.bank_app(*link)
    for _ in range(4):
        machine.a_round_trip()
        machine.each_sim_holds_what_was_loaded_and_at_most_what_may_have_been()
    machine.teardown()
