"""The SIM's phone menu (SIM Toolkit) and the phone simulator, and the headline flow in one
process: menu → top-up request SMS → order → bank payment from the link → secured packets
→ the phone's SIM loaded → the menu shows the new balance."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from reader_sim.phone import Phone, PhoneError, ScriptedScreen
from reader_sim.smsc import SmsCentre
from sim_applet.apdu import CommandApdu
from sim_applet.personalize import personalize
from sim_applet.sim import Sim
from sim_applet.stk import (
    CommandType,
    ProactiveCommand,
    Result,
    TerminalResponse,
    menu_selection,
    parse_menu_selection,
)
from sim_applet.toolkit import ToolkitSettings
from tests.bank_doubles import RefusingBank
from tests.helpers import Clock, purse
from tests.test_reconciliation_statement import HEADER as STATEMENT_HEADER
from tests.test_wallet_topups import BANK_CARD, PHONE, World
from tests.wallet_fixtures import Wallet
from wallet_service.models import Card, TopUpOrder
from wallet_service.services import cards
from wallet_service.sms_gateway import InProcessGateway
from wallet_service.worker import run_once

SHORT_CODE = "10658888"
SERIAL = bytes.fromhex("20260000000000009001")

# --- the toolkit codec, against ETSI TS 102 384 test sequences ----------------------------


def test_display_text_is_byte_exact_with_ts_102_384() -> None:
    command = ProactiveCommand(1, CommandType.DISPLAY_TEXT, 0x80, text="Toolkit Test 1")
    expected = "D01A8103012180820281028D0F04546F6F6C6B697420546573742031"  # 27.22.4.1.1
    assert command.encode().hex().upper() == expected
    assert ProactiveCommand.decode(bytes.fromhex(expected)) == command.__class__(
        1, CommandType.DISPLAY_TEXT, 0x80, text="Toolkit Test 1", destination=0x02
    )


def test_get_input_and_set_up_menu_are_byte_exact_with_ts_102_384() -> None:
    get_input = ProactiveCommand(
        1, CommandType.GET_INPUT, 0x00, text="Enter 12345", response_length=(5, 5)
    )
    assert get_input.encode().hex().upper() == (  # 27.22.4.3.1 seq 1.1
        "D01B8103012300820281828D0C04456E746572203132333435910205" + "05"
    )
    menu = ProactiveCommand(
        1,
        CommandType.SET_UP_MENU,
        alpha="Toolkit Menu",
        items=tuple((i, f"Item {i}") for i in range(1, 5)),
    )
    assert menu.encode().hex().upper() == (  # 27.22.4.8.1 seq 1.1
        "D03B810301250082028182850C546F6F6C6B6974204D656E75"
        "8F07014974656D20318F07024974656D20328F07034974656D20338F07044974656D2034"
    )
    assert menu_selection(2).hex().upper() == "D30782020181900102"
    assert parse_menu_selection(menu_selection(2)) == 2


def test_terminal_response_and_chinese_texts_round_trip() -> None:
    display = ProactiveCommand(1, CommandType.DISPLAY_TEXT, 0x80, text="余额：30.00元")
    answer = TerminalResponse.for_command(display)
    assert answer.encode().hex().upper() == "810301218082028281830100"  # 27.22.4.1.1
    assert ProactiveCommand.decode(display.encode()).text == "余额：30.00元"
    typed = TerminalResponse(2, CommandType.GET_INPUT, 0, Result.OK, text="123456")
    assert TerminalResponse.decode(typed.encode()) == typed


# --- the menu on the SIM, through the phone ------------------------------------------------


class Radio:
    """A phone's SMS line that records what it sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self.sent.append((to, user_data, udh))

    def receive(self, wait_ms: int = 0, *, submit: list | None = None) -> list:  # type: ignore[type-arg]
        self.sent.extend(submit or [])
        return []


def phone_with(sim: Sim, *answers: str) -> tuple[Phone, ScriptedScreen, Radio]:
    screen, radio = ScriptedScreen(list(answers)), Radio()
    phone = Phone(sim, PHONE, radio, screen)
    phone.power_on()
    return phone, screen, radio


def test_the_menu_in_chinese_and_english_and_the_setting_persists(tmp_path: Path) -> None:
    sim = personalize(SERIAL, balance_fen=3050)
    phone, screen, _ = phone_with(sim, "2")
    assert phone.menu is not None and phone.menu.title == "公交卡"
    assert [text for _, text in phone.menu.items][:4] == [
        "余额查询",
        "充值记录",
        "乘车记录",
        "空中充值",
    ]
    phone.select(1)
    assert screen.screens[-1] == "余额：30.50元"
    phone.select(7)  # language → English
    assert phone.menu.title == "Bus card"
    sim.save(tmp_path / "sim.json")
    again, screen, _ = phone_with(Sim.load(tmp_path / "sim.json"))
    assert again.menu is not None and again.menu.items[0] == (1, "Balance")
    again.select(1)
    assert screen.screens[-1] == "Balance: 30.50 yuan"


def test_history_comes_from_the_cards_own_log() -> None:
    from reader_sim.link import InMemoryLink
    from tests.helpers import load, new_pos

    sim = personalize(SERIAL, menu=ToolkitSettings("en"))
    load(sim, 5000)  # at a counter
    new_pos(fare_fen=200).present(InMemoryLink(sim))  # then a ride
    phone, screen, _ = phone_with(sim)
    phone.select(2)
    assert screen.screens[-1].endswith("+50.00") and "\n" not in screen.screens[-1]
    phone.select(3)
    assert screen.screens[-1].endswith("-2.00")
    fresh, screen, _ = phone_with(personalize(SERIAL, menu=ToolkitSettings("en")))
    fresh.select(3)
    assert screen.screens[-1] == "No rides yet"


def test_a_top_up_request_needs_the_pin_and_carries_the_cards_mac() -> None:
    sim = personalize(SERIAL, menu=ToolkitSettings("en"))
    phone, screen, radio = phone_with(sim, "30", "000000")
    phone.select(4)
    assert screen.screens[-1] == "Wrong PIN, 2 tries left" and radio.sent == []
    phone, screen, radio = phone_with(sim, "30", "123456")
    phone.select(4)
    assert screen.screens[-1].startswith("Top-up of 30.00 yuan requested")
    [(to, user_data, udh)] = radio.sent
    assert (to, udh, user_data[:4], len(user_data)) == (SHORT_CODE, b"", b"BUSR", 30)
    assert purse(sim).pin_tries_left == 3  # the right PIN gives the try back


def test_a_delivery_that_fails_still_sends_the_proofs_of_the_packets_before_it() -> None:
    """A packet, then a payment link the bank app fails to pay, in one poll: the SIM ran
    the packet, so its proof of receipt leaves (on its own), and the failure is raised."""
    from otar.packets import Spi, encode_command
    from otar.remote_apdu import encode_script
    from otar.sim_side import TRANSIT_TAR
    from reader_sim.smsc import Sms

    sim = personalize(SERIAL, ota_masters=(bytes(range(16)), bytes(range(16, 32))))
    [(index, keys)] = sim.ota.keysets.items()  # type: ignore[union-attr]
    select = CommandApdu(0x00, 0xA4, 0x04, 0x00, bytes.fromhex("A000000632010105")).encode()
    packet = encode_command(keys, Spi(), TRANSIT_TAR, 1, encode_script([select]))
    link = "pay buspay://BUSCARD/order-1/100".encode("utf-16-be")
    delivered = [
        Sms(1, SHORT_CODE, PHONE, b"\x02\x70\x00", packet, datetime.now()),
        Sms(2, SHORT_CODE, PHONE, b"", link, datetime.now()),
    ]

    class OneBatch(Radio):
        def receive(self, wait_ms: int = 0, *, submit: list | None = None) -> list:  # type: ignore[type-arg]
            super().receive(wait_ms, submit=submit)
            batch, delivered[:] = list(delivered), []  # (the one batch, then nothing)
            return batch

    def bank_app_down(merchant: str, order_id: str, amount_fen: int) -> None:
        raise ConnectionError("the bank app cannot reach the bank")

    radio = OneBatch()
    phone = Phone(sim, PHONE, radio, ScriptedScreen(), bank_app_down)
    with pytest.raises(ConnectionError):
        phone.receive()
    [(to, _, udh)] = radio.sent
    assert (to, udh, sim.ota.last_counters[index]) == (SHORT_CODE, b"\x02\x71\x00", 1)  # type: ignore[union-attr]


@pytest.mark.parametrize("amount", ["0", "1001", ""])
def test_a_top_up_amount_out_of_range_sends_nothing(amount: str) -> None:
    phone, screen, radio = phone_with(personalize(SERIAL, menu=ToolkitSettings("en")), amount)
    phone.select(4)
    assert radio.sent == []
    if amount:
        assert screen.screens[-1] == "Enter 1 to 1000 yuan"


def test_change_pin_from_the_menu() -> None:
    sim = personalize(SERIAL, menu=ToolkitSettings("en"))
    phone, screen, _ = phone_with(sim, "123456", "2468", "2486")
    phone.select(6)
    assert screen.screens[-1] == "The new PINs differ"
    phone, screen, _ = phone_with(sim, "123456", "2468", "2468")
    phone.select(6)
    assert screen.screens[-1] == "PIN changed"
    phone, screen, radio = phone_with(sim, "2468")
    phone.select(5)  # report loss with the new PIN
    assert screen.screens[-1] == "Loss report sent" and len(radio.sent) == 1


def test_the_sim_refuses_toolkit_misuse() -> None:
    sim = personalize(SERIAL)
    assert sim.transmit(bytes.fromhex("8012000010"))[-2:] == bytes.fromhex("6985")  # FETCH
    tr = TerminalResponse(1, CommandType.DISPLAY_TEXT, 0x80).encode()
    answer = sim.transmit(CommandApdu(0x80, 0x14, 0, 0, tr).encode())
    assert answer[-2:] == bytes.fromhex("6985")  # nothing to answer
    phone, _, _ = phone_with(sim)
    with pytest.raises(PhoneError):
        phone.select(9)
    bad = CommandApdu(0x80, 0xC2, 0, 0, menu_selection(9)).encode()
    assert sim.transmit(bad)[-2:] == bytes.fromhex("6A80")
    garbage = CommandApdu(0x80, 0xC2, 0, 0, bytes.fromhex("D305FFFF")).encode()
    assert sim.transmit(garbage)[-2:] == bytes.fromhex("6A80")


# --- the headline flow in one process --------------------------------------------------------


def _work_until(world: PhoneWorld, state: str) -> None:
    """Worker passes, the phone answering between them, until the one order is in
    ``state``."""
    for _ in range(12):
        run_once(world.wallet.app, world.gateway, world.bank)
        if [s for _, s, _ in _orders(world.wallet)] == [state]:
            return
        world.phone.receive()
    raise AssertionError(f"the order never reached {state}")


class PhoneWorld(World):
    def __init__(self, wallet: Wallet, tmp_path: Path) -> None:
        super().__init__(wallet, tmp_path)
        self.smsc = SmsCentre(clock=Clock(), random=random.Random(1))
        self.gateway = InProcessGateway(self.smsc, SHORT_CODE)
        self.screen = ScriptedScreen()
        self.phone = Phone(
            self.sim, PHONE, InProcessGateway(self.smsc, PHONE), self.screen, self.bank_app
        )
        self.phone.power_on()

    def bank_app(self, merchant: str, order_id: str, amount_fen: int) -> None:
        self.bank.pay(merchant, order_id, amount_fen, BANK_CARD)
        self.deliver_callbacks()

    def settle(self, passes: int = 8) -> None:
        for _ in range(passes):
            run_once(self.wallet.app, self.gateway, self.bank)
            if not self.phone.receive():
                run_once(self.wallet.app, self.gateway, self.bank)
                if not self.phone.receive():
                    return


def test_top_up_from_the_phone_menu_end_to_end(wallet: Wallet, tmp_path: Path) -> None:
    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    world.settle()
    assert purse(world.sim).balance == 3000
    assert any(text.startswith("充值成功 Top-up OK 30.00") for text in world.phone.inbox)
    world.phone.select(1)
    assert world.screen.screens[-1] == "余额：30.00元"
    assert world.books()[f"card_float:{world.serial}"] == 3000
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 3000
    world.bank.close()


class CountingLine(InProcessGateway):
    """A phone's line that counts its sends and what its polls carried."""

    def __init__(self, centre: SmsCentre, number: str) -> None:
        super().__init__(centre, number)
        self.sends, self.sent_with_polls = 0, 0

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self.sends += 1
        super().send(to, user_data, udh)

    def receive(self, wait_ms=0, lease_ms=0, acknowledge=None, submit=None):  # type: ignore[no-untyped-def]
        self.sent_with_polls += len(submit or [])
        return super().receive(wait_ms, lease_ms, acknowledge, submit)


def test_the_sims_proofs_of_receipt_ride_the_phones_next_poll(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Each proof of receipt leaves with the phone's next poll, not in a request of its
    own — and before ``receive`` returns: the platform has it at once."""
    world = PhoneWorld(wallet, tmp_path)
    world.phone.line = line = CountingLine(world.smsc, PHONE)
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    packets_seen = 0
    for _ in range(8):
        run_once(world.wallet.app, world.gateway, world.bank)
        waiting = [sms for _, sms in world.smsc._boxes.get(PHONE, []) if sms.udh[1:2] == b"\x70"]
        world.phone.receive()
        proofs = [sms.udh for _, sms in world.smsc._boxes.get(SHORT_CODE, [])]
        assert proofs == [b"\x02\x71\x00"] * len(waiting)
        packets_seen += len(waiting)
    assert purse(world.sim).balance == 3000
    assert (packets_seen, line.sent_with_polls, line.sends) == (2, 2, 1)  # (1: the request)
    world.bank.close()


def test_a_forged_or_foreign_request_makes_no_order(wallet: Wallet, tmp_path: Path) -> None:
    from sim_applet.personalize import IssuerKeys

    world = PhoneWorld(wallet, tmp_path)
    clone = personalize(
        bytes.fromhex(world.serial),
        issuer=IssuerKeys(*(bytes([n]) * 16 for n in range(1, 6))),
        menu=ToolkitSettings("en"),
    )
    forger = Phone(
        clone, PHONE, InProcessGateway(world.smsc, PHONE), ScriptedScreen(["30", "123456"])
    )
    forger.power_on()
    forger.select(4)  # right serial, right phone number, wrong key
    other = Phone(
        world.sim, "13900000000", InProcessGateway(world.smsc, "13900000000"), ScriptedScreen()
    )
    other.power_on()
    other.screen.answers[:] = ["30", "123456"]  # type: ignore[attr-defined]
    other.select(4)  # the right card, from another phone
    run_once(world.wallet.app, world.gateway, world.bank)
    assert world.phone.receive() == 0 and other.receive() == 0
    assert world.bank.webhook_log() == [] and world.phone.payment_links == []
    world.bank.close()


def test_loss_report_from_the_phone_puts_the_card_on_the_hot_list(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)
    run_once(world.wallet.app, world.gateway, world.bank)
    world.phone.receive()
    assert world.phone.inbox == ["已挂失 Card reported lost"]
    card = wallet.ok("GET", f"/api/v1/cards/{world.serial}")
    assert card["status"] == "lost"
    world.bank.close()


def test_a_message_that_fails_is_dropped_alone_with_its_packets(
    wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker handles what one receive brought in one transaction; when a message
    fails, the batch again with each message in its savepoint: the loss report below
    fails after doing its work — its card change and its notice vanish, while the top-up
    request before it stands (once: the failed batch sent nothing)."""
    import wallet_service.worker as worker_module

    real = worker_module.handle_incoming_sms
    outcomes: list[str] = []

    def failing_after_loss_reports(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        outcomes.append(real(ctx, box, sms, merchant))
        if ctx.session.scalar(select(Card.status)) == "lost":
            raise RuntimeError("a bug after the work was done")
        return outcomes[-1]

    monkeypatch.setattr(worker_module, "handle_incoming_sms", failing_after_loss_reports)
    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)  # a top-up request …
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)  # … then a loss report, both waiting for the worker
    worker = worker_module.Worker(wallet.app, world.gateway, world.bank)
    assert worker.read_sms() == 2 and len(outcomes) == 4  # the batch, then one by one
    world.phone.receive()
    assert [link[2] for link in world.phone.payment_links] == [1200]
    assert not any("lost" in text for text in world.phone.inbox)
    assert wallet.ok("GET", f"/api/v1/cards/{world.serial}")["status"] == "active"
    with wallet.database.transaction() as session:
        assert session.scalar(select(TopUpOrder.state)) == "created"
    world.bank.close()


def test_a_message_the_database_refuses_is_dropped_alone(
    pg_wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL refuses a statement (bad data, not a race): that message's savepoint
    rolls back and the transaction goes on with the others."""
    from sqlalchemy import text

    import wallet_service.worker as worker_module

    real = worker_module.handle_incoming_sms

    def refused_after_loss_reports(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        outcome = real(ctx, box, sms, merchant)
        if ctx.session.scalar(select(Card.status)) == "lost":
            ctx.session.execute(text("SELECT 1 / 0"))  # division_by_zero: a DataError
        return outcome

    monkeypatch.setattr(worker_module, "handle_incoming_sms", refused_after_loss_reports)
    world = PhoneWorld(pg_wallet, tmp_path)
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)  # a loss report the database refuses …
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)  # … then a top-up request
    worker = worker_module.Worker(pg_wallet.app, world.gateway, world.bank)
    assert worker.read_sms() == 2
    world.phone.receive()
    assert [link[2] for link in world.phone.payment_links] == [1200]
    assert pg_wallet.ok("GET", f"/api/v1/cards/{world.serial}")["status"] == "active"
    world.bank.close()


def test_a_message_whose_rows_the_commit_refuses_is_dropped_alone(
    wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's transfers go in as it commits (``db.insert_at_commit``), so a unique
    reference taken fails the commit, not the message that posted it. Done again one
    savepoint per message, that message's transfer goes in at once, inside its savepoint:
    only it is dropped, and the top-up request beside it stands."""
    import wallet_service.worker as worker_module
    from tests.test_wallet_ledger_and_registry import _pay_in

    def post_taken(session) -> None:  # type: ignore[no-untyped-def]
        _pay_in(session, 1, "taken")

    with wallet.database.transaction() as session:
        post_taken(session)
    real = worker_module.handle_incoming_sms

    def posting_taken_for_loss_reports(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        outcome = real(ctx, box, sms, merchant)
        if ctx.session.scalar(select(Card.status)) == "lost":
            post_taken(ctx.session)
        return outcome

    monkeypatch.setattr(worker_module, "handle_incoming_sms", posting_taken_for_loss_reports)
    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)  # a top-up request …
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)  # … then a loss report whose transfer the database refuses
    worker = worker_module.Worker(wallet.app, world.gateway, world.bank)
    assert worker.read_sms() == 2
    world.phone.receive()
    assert [link[2] for link in world.phone.payment_links] == [1200]
    assert wallet.ok("GET", f"/api/v1/cards/{world.serial}")["status"] == "active"
    assert wallet.ok("GET", "/api/v1/ledger")["balanced"]
    world.bank.close()


def test_the_worker_running_forever_serves_the_phone(wallet: Wallet, tmp_path: Path) -> None:
    """``run_forever`` (the SMS loop and the database loop side by side) in a thread."""
    import threading
    import time

    from wallet_service.worker import run_forever

    world = PhoneWorld(wallet, tmp_path)
    wallet.app.config["CLOCK"] = _real_now  # a worker runs on real time: long polls, waits
    world.smsc.clock = _real_now
    stop = threading.Event()
    worker = threading.Thread(
        target=run_forever, args=(wallet.app, world.gateway, world.bank, stop), daemon=True
    )
    worker.start()
    try:
        world.screen.answers[:] = ["12", "123456"]
        world.phone.select(4)
        deadline = time.monotonic() + 20
        while not any("Top-up OK" in text for text in world.phone.inbox):
            assert time.monotonic() < deadline, world.phone.inbox
            world.phone.receive(wait_ms=200)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert purse(world.sim).balance == 1200
    world.bank.close()


def _real_now():  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.now().replace(microsecond=0)


def _orders(wallet: Wallet) -> list[tuple[int, str, str | None]]:
    with wallet.database.transaction() as session:
        return [
            (order.amount_fen, order.state, order.failure)
            for order in session.scalars(select(TopUpOrder).order_by(TopUpOrder.id))
        ]


def test_two_top_ups_requested_back_to_back_load_one_after_the_other(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Both paid at once: one load at a time per card (two INITIALIZE FOR LOAD before one
    CREDIT would fail the first, and its packet counters would then be replays — it used
    to stay proving for ever, the passenger's 30 yuan neither loaded nor refunded)."""
    from wallet_service.services.topups import card_busy_wait_s

    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    world.screen.answers[:] = ["20", "123456"]
    world.phone.select(4)
    world.settle()
    assert [state for _, state, _ in _orders(wallet)] == ["loaded", "paid"]  # the second waits
    world.later(card_busy_wait_s)
    world.settle()
    assert _orders(wallet) == [(3000, "loaded", None), (2000, "loaded", None)]
    assert purse(world.sim).balance == 5000
    assert world.books()[f"card_float:{world.serial}"] == 5000
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 5000
    world.bank.close()


def test_an_earlier_order_paid_after_a_later_one_started_loads_after_it(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The later order's packets went first; the earlier one's counters then count on
    from the card's last (with counters from its order id, the SIM refused them as
    replays)."""
    from wallet_service.services.topups import card_busy_wait_s

    world = PhoneWorld(wallet, tmp_path)
    world.phone.pay = None  # the passenger pays by hand, second link first
    for amount in ("30", "20"):
        world.screen.answers[:] = [amount, "123456"]
        world.phone.select(4)
    world.settle()
    first, second = world.phone.payment_links
    world.bank_app(*second)
    run_once(world.wallet.app, world.gateway, world.bank)  # its packet 1 is out
    world.bank_app(*first)
    world.settle()
    world.later(card_busy_wait_s)
    world.settle()
    assert _orders(wallet) == [(3000, "loaded", None), (2000, "loaded", None)]
    assert purse(world.sim).balance == 5000
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 5000
    assert world.books()["topup_pending:platform"] == 0
    world.bank.close()


def test_an_sms_centre_down_after_the_commit_is_not_taken_for_a_failed_message(
    wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch committed, then its packets could not leave: the worker's loop waits and
    tries again (the order's timeouts resend); the batch must not be handled twice."""
    import wallet_service.worker as worker_module
    from wallet_service.sms_gateway import GatewayError

    real = worker_module.handle_incoming_sms
    handled: list[str] = []

    def counting(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        handled.append(real(ctx, box, sms, merchant))
        return handled[-1]

    def down(messages) -> None:  # type: ignore[no-untyped-def]
        raise GatewayError("SMS centre down")

    monkeypatch.setattr(worker_module, "handle_incoming_sms", counting)
    world = PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)
    monkeypatch.setattr(world.gateway, "send_many", down)
    worker = worker_module.Worker(wallet.app, world.gateway, world.bank)
    with pytest.raises(GatewayError):
        worker.read_sms()
    assert len(handled) == 1
    with wallet.database.transaction() as session:
        assert session.scalar(select(TopUpOrder.state)) == "created"
    world.bank.close()


def test_a_batch_lost_to_a_database_outage_is_delivered_again(
    wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker acknowledges an SMS only once its batch committed: the SMS centre
    delivers a batch lost to an outage (or to a worker killed) again after its lease."""
    from sqlalchemy.exc import OperationalError

    import wallet_service.worker as worker_module

    real = worker_module.handle_incoming_sms
    outage = [True]

    def flaky(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        if outage:
            outage.clear()
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return real(ctx, box, sms, merchant)

    monkeypatch.setattr(worker_module, "handle_incoming_sms", flaky)
    world = PhoneWorld(wallet, tmp_path)
    world.phone.pay = None
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)
    worker = worker_module.Worker(wallet.app, world.gateway, world.bank)
    with pytest.raises(OperationalError):
        worker.read_sms()
    assert worker.read_sms() == 0  # leased to the worker that failed
    world.smsc.clock.advance(seconds=worker_module.sms_lease_ms / 1000)  # type: ignore[attr-defined]
    assert worker.read_sms() == 1
    world.phone.receive()
    assert [link[2] for link in world.phone.payment_links] == [1200]
    world.smsc.clock.advance(seconds=worker_module.sms_lease_ms / 1000)  # type: ignore[attr-defined]
    assert worker.read_sms() == 0  # acknowledged: not again
    world.bank.close()


def test_a_message_that_always_conflicts_is_dropped_not_delivered_for_ever(
    wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A uniqueness conflict that retrying does not clear: the batch again, a savepoint per
    message — that message alone is dropped and acknowledged; with leases it would
    otherwise come back every 30 s and take the messages beside it down too."""
    from sqlalchemy.exc import IntegrityError

    import wallet_service.worker as worker_module

    real = worker_module.handle_incoming_sms

    def conflicting_loss_reports(ctx, box, sms, merchant):  # type: ignore[no-untyped-def]
        outcome = real(ctx, box, sms, merchant)
        if ctx.session.scalar(select(Card.status)) == "lost":
            raise IntegrityError("INSERT …", {}, Exception("duplicate key value"))
        return outcome

    monkeypatch.setattr(worker_module, "handle_incoming_sms", conflicting_loss_reports)
    world = PhoneWorld(wallet, tmp_path)
    world.phone.pay = None
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)  # a loss report that always conflicts …
    world.screen.answers[:] = ["12", "123456"]
    world.phone.select(4)  # … and a top-up request beside it
    worker = worker_module.Worker(wallet.app, world.gateway, world.bank)
    assert worker.read_sms() == 2
    world.phone.receive()
    assert [link[2] for link in world.phone.payment_links] == [1200]
    assert wallet.ok("GET", f"/api/v1/cards/{world.serial}")["status"] == "active"
    world.smsc.clock.advance(seconds=worker_module.sms_lease_ms / 1000)  # type: ignore[attr-defined]
    assert worker.read_sms() == 0  # both acknowledged
    world.bank.close()


def _top_up_reporting_loss_at(world: PhoneWorld, state: str) -> None:
    """A top-up of 30 yuan from the menu, worked step by step; the card is reported lost
    the moment its order reaches ``state`` (before the phone receives the next packet)."""

    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    lost = False
    for _ in range(12):
        run_once(world.wallet.app, world.gateway, world.bank)
        if not lost and [s for _, s, _ in _orders(world.wallet)] == [state]:
            world.run(
                lambda ctx: cards.mark_lost(ctx, cards.card_by_serial(ctx, world.serial), "x")
            )
            lost = True
        world.phone.receive()
    assert lost


def test_a_card_reported_lost_after_its_credit_was_sent_still_has_the_load_posted(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The CREDIT may have run: the phone's proof settles it (it used to be dropped as from
    an unknown phone, and the order stayed unsettled for ever)."""
    world = PhoneWorld(wallet, tmp_path)
    _top_up_reporting_loss_at(world, "credit_sent")
    assert _orders(wallet) == [(3000, "loaded", None)]
    assert purse(world.sim).balance == 3000
    assert world.books()[f"card_float:{world.serial}"] == 3000  # (goes to its replacement)
    world.bank.close()


def test_a_card_reported_lost_before_its_credit_gets_none_and_the_money_goes_back(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = PhoneWorld(wallet, tmp_path)
    _top_up_reporting_loss_at(world, "init_sent")
    assert _orders(wallet) == [(3000, "refunded", "the card is lost")]
    assert purse(world.sim).balance == 0
    assert world.bank.card_balance(BANK_CARD) == 100_000
    world.bank.close()


def test_the_worker_refunds_money_for_an_unknown_order(wallet: Wallet, tmp_path: Path) -> None:
    world = PhoneWorld(wallet, tmp_path)
    world.bank_app("BUSCARD", "NOBODY-1", 100)
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 100
    report = run_once(world.wallet.app, world.gateway, world.bank)
    assert report.bank_events == 1 and report.steps == 1
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert run_once(world.wallet.app, world.gateway, world.bank).steps == 0
    world.bank.close()


def test_a_lost_card_with_a_credit_unsettled_is_reissued_only_once_it_is_settled(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Re-issued first, the old card's float would move without the load, and its phone's
    proof would find no card: 30 yuan on the old SIM and 30 in the books, never settled."""
    from wallet_service.errors import Conflict

    world, _ = _lost_with_its_credit_unanswered(wallet, tmp_path)
    with pytest.raises(Conflict, match="being settled"):
        _reissue(world)
    world.settle()
    assert _orders(wallet) == [(3000, "loaded", None)]
    new_card = _reissue(world)
    assert world.books()[f"card_float:{new_card.serial}"] == 3000
    world.bank.close()


def _reissue(world: PhoneWorld) -> Card:
    """The lost card re-issued at a counter, its holder's id shown (the platform's own
    context: the new image is written to the personalization folder)."""
    from sqlalchemy import update

    from wallet_service.services.registry import Context

    id_number = "110101199001011234"
    with world.wallet.database.transaction() as session:
        session.execute(update(Card).values(holder_id_number=id_number))
    return world.wallet.database.run(
        lambda session: cards.reissue(
            Context.for_platform(session, world.wallet.app.config),
            world.serial,
            id_number,
            "8986001234567890999",
            PHONE,
        )
    )


def _lost_with_its_credit_unanswered(
    wallet: Wallet,
    tmp_path: Path,
    world: PhoneWorld | None = None,
    before_the_loss: Callable[[], object] = lambda: None,
) -> tuple[PhoneWorld, str]:
    """A top-up whose packet 2 waits at the SMS centre for a phone reported lost, and the
    path that settles it."""

    world = world or PhoneWorld(wallet, tmp_path)
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    _work_until(world, "credit_sent")
    before_the_loss()
    world.run(lambda ctx: cards.mark_lost(ctx, cards.card_by_serial(ctx, world.serial), "x"))
    [order] = wallet.ok("GET", f"/api/v1/cards/{world.serial}/topups")["orders"]
    return world, f"/api/v1/cards/{world.serial}/topups/{order['reference']}/settle-unproven"


def _pos_has_the_hot_list(wallet: Wallet) -> None:
    """The bus POS (World's BUS1) tells it holds the latest hot list, nothing to upload."""
    from wallet_service.models import BlacklistChange

    with wallet.database.transaction() as session:
        version = session.scalar(select(func.max(BlacklistChange.version)))
    beat = {"firmware": "1.0", "blacklist_version": version, "records_pending": 0, "psam_seq": 1}
    wallet.ok("POST", "/api/v1/pos/heartbeat", wallet.token("pos", terminal_id=POS_ID), beat)


POS_ID = "000012000001"
REASON = {"reason": "phone lost, no answer since"}


def test_a_lost_sims_unproven_load_is_settled_by_an_operator_days_later(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The phone is lost with packet 2 on its way and never answers: the order would prove
    for ever and the card could never be re-issued. Days after the loss report, every POS
    holding the hot list, an operator settles it: refunded; the card is re-issued; should
    the lost SIM answer after all, its proof is stale — and put on record."""

    from wallet_service.services import topups

    world, settle = _lost_with_its_credit_unanswered(wallet, tmp_path)
    world.later(topups.unproven_settle_wait_s - 60)
    code, answer = wallet.call("POST", settle, body=REASON)
    assert code == 409 and "can be settled from" in answer["error"]["message"]  # too soon
    world.later(60)
    code, answer = wallet.call("POST", settle, body=REASON)
    assert code == 409 and f"POS {POS_ID} have not told" in answer["error"]["message"]
    _pos_has_the_hot_list(wallet)
    counter = wallet.token("counter", hall_code="HALL-BUS1")  # (World set up BUS1)
    assert wallet.call("POST", settle, counter, REASON)[0] == 403
    assert wallet.call("POST", settle, body={"reason": "  "})[0] in (400, 422)
    assert wallet.ok("POST", settle, body=REASON)["state"] == "refunding"
    run_once(wallet.app, world.gateway, world.bank)
    assert _orders(wallet) == [(3000, "refunded", topups.SETTLED_UNPROVEN)]
    assert world.bank.card_balance(BANK_CARD) == 100_000
    assert world.books()["topup_pending:platform"] == 0
    assert wallet.call("POST", settle, body=REASON)[0] == 409  # settled once
    [settled] = wallet.audited("topup.settled_unproven")
    assert settled["reason"] == REASON["reason"]
    world.phone.receive()  # the lost SIM answers after all: CREDIT, and its PoR
    run_once(wallet.app, world.gateway, world.bank)
    assert purse(world.sim).balance == 3000  # on a SIM every POS refuses
    assert _orders(wallet)[0][1] == "refunded"
    assert world.books()["topup_pending:platform"] == 0
    assert world.books().get(f"card_float:{world.serial}", 0) == 0
    assert wallet.audited("topup.proved_after_settlement")[0]["amount_fen"] == 3000
    day = wallet.clock().date()  # the refund's day (the bank's own clock is another)
    report = wallet.ok(
        "POST", f"/api/v1/bank/reconciliation/{day}", body={"statement_csv": STATEMENT_HEADER}
    )
    assert report["notes"] == [
        {"kind": "settled_unproven", "order": settled["order"], "order_fen": 3000}
    ]
    new_card = _reissue(world)
    assert world.books().get(f"card_float:{new_card.serial}", 0) == 0
    world.bank.close()


def _pos_retired(wallet: Wallet, terminal_id: str) -> None:
    """Another POS on BUS1's bus, registered, then retired without a heartbeat ever."""
    path = "/api/v1/operators/BUS1/pos-devices"
    wallet.ok("POST", path, body={"terminal_id": terminal_id, "vehicle": "V1201"})
    wallet.ok("POST", f"{path}/{terminal_id}/retire", body={"reason": "bus scrapped"})


def test_settling_unproven_does_not_wait_for_a_pos_retired_before_the_order(
    wallet: Wallet, tmp_path: Path
) -> None:
    """A POS out of service never tells again; retired before the order was made, it
    cannot hold a fare after it."""
    from wallet_service.services import topups

    world = PhoneWorld(wallet, tmp_path)
    _pos_retired(wallet, "000012000009")
    world.later(1)  # (the order comes after the retirement, as it would)
    world, settle = _lost_with_its_credit_unanswered(wallet, tmp_path, world)
    world.later(topups.unproven_settle_wait_s)
    _pos_has_the_hot_list(wallet)
    assert wallet.ok("POST", settle, body=REASON)["state"] == "refunding"
    world.bank.close()


def test_settling_unproven_waits_for_a_pos_retired_after_the_order(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Retired after the order was made (and before the loss), it may have taken a fare
    paid with the load before it left service: its records would have told, and they
    never will."""
    from wallet_service.services import topups

    def retired_meanwhile() -> None:
        wallet.clock.now += timedelta(seconds=1)
        _pos_retired(wallet, "000012000009")
        wallet.clock.now += timedelta(seconds=1)

    world, settle = _lost_with_its_credit_unanswered(wallet, tmp_path, None, retired_meanwhile)
    world.later(topups.unproven_settle_wait_s)
    _pos_has_the_hot_list(wallet)
    code, answer = wallet.call("POST", settle, body=REASON)
    assert code == 409 and "POS 000012000009 have not told" in answer["error"]["message"]
    assert _orders(wallet)[0][1] == "credit_sent"
    world.bank.close()


def test_a_lost_card_used_after_its_top_up_is_not_settled_unproven(
    wallet: Wallet, tmp_path: Path
) -> None:
    """A fare after the CREDIT may have spent the load: a refund would pay it twice."""
    from wallet_service.models import PosDevice, TapRecord
    from wallet_service.services import topups

    world, settle = _lost_with_its_credit_unanswered(wallet, tmp_path)
    world.later(topups.unproven_settle_wait_s)
    _pos_has_the_hot_list(wallet)
    with wallet.database.transaction() as session:
        device = session.scalars(select(PosDevice)).one()
        session.add(
            TapRecord(
                terminal_id=POS_ID, terminal_seq=1, device_id=device.id,
                operator_id=device.operator_id, card_serial=world.serial, ctc=1,
                amount_fen=200, balance_before_fen=3000, balance_after_fen=2800,
                transaction_type=6, occurred_at=wallet.clock() - timedelta(days=2),
                tac="AAAAAAAA", mac2="BBBBBBBB", mac2_verified=True, key_version=1,
                algorithm=0, route="12", vehicle="V1201", driver="D007", recovered=False,
                received_at=wallet.clock(),
            )
        )  # fmt: skip
    code, answer = wallet.call("POST", settle, body=REASON)
    assert code == 409 and "paid a fare at" in answer["error"]["message"]
    assert _orders(wallet)[0][1] == "credit_sent"
    world.bank.close()


def test_a_bank_down_costs_a_worker_pass_one_attempt_not_one_a_refund_due(
    wallet: Wallet, tmp_path: Path
) -> None:
    """(Each attempt may wait out the request timeout: the other due work goes first.)"""
    import requests

    from wallet_service.services import topups

    world = PhoneWorld(wallet, tmp_path)
    for amount in (2000, 1000):
        world.pay(world.order(amount=amount), amount=amount + 500)  # both to refund
    world.bank_app("BUSCARD", "NOBODY-1", 100)  # and money for an order never made

    down = RefusingBank(requests.ConnectionError("connection refused"))
    run_once(world.wallet.app, world.gateway, down)
    assert down.asked == 1
    world.later(topups.refund_retry_s)
    run_once(world.wallet.app, world.gateway, world.bank)
    assert [state for _, state, _ in _orders(wallet)] == ["refunded", "refunded"]
    assert world.bank.card_balance(BANK_CARD) == 100_000
    world.bank.close()


def test_a_card_closed_while_packet_1_s_answer_is_on_its_way_gets_no_credit(
    pg_wallet: Wallet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker read the card (active) before the counter closed it, then takes the
    order: the close sent it to a refund under the order's lock, so the answer is stale —
    it used to send CREDIT to the closed card (30 yuan on it, 30 stuck in the books)."""
    import threading

    from sqlalchemy import update

    from wallet_service.auth import Principal
    from wallet_service.models import BusinessHall
    from wallet_service.services import topups
    from wallet_service.services.registry import Context

    wallet = pg_wallet
    world = PhoneWorld(wallet, tmp_path)
    id_number = "110101199001011234"
    with wallet.database.transaction() as session:
        session.execute(update(Card).values(holder_id_number=id_number))
        hall_id = session.scalar(select(BusinessHall.id))
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    _work_until(world, "init_sent")
    closed: list[object] = []
    keys, perso = wallet.app.config["KEY_STORE"], Path(wallet.app.config["PERSONALIZATION_DIR"])
    counter = Principal(1, "counter", hall_id=hall_id)

    def close() -> None:
        closed.append(
            wallet.database.run(
                lambda s: cards.close(
                    Context(s, counter, wallet.clock(), keys, perso), world.serial, id_number
                )
            )
        )

    answered = topups.on_proof_of_receipt

    def closed_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not closed:  # (the card was read before: active)
            thread = threading.Thread(target=close)
            thread.start()
            thread.join(10)
        return answered(*args, **kwargs)

    monkeypatch.setattr(topups, "on_proof_of_receipt", closed_meanwhile)
    world.phone.receive()  # the SIM answers packet 1
    run_once(wallet.app, world.gateway, world.bank)
    monkeypatch.setattr(topups, "on_proof_of_receipt", answered)
    assert closed
    world.settle()
    assert _orders(wallet) == [(3000, "refunded", "the card was closed or re-issued")]
    assert purse(world.sim).balance == 0
    assert world.bank.card_balance(BANK_CARD) == 100_000
    world.bank.close()


def test_the_phone_knows_the_platforms_notices_that_end_a_top_up(
    wallet: Wallet, tmp_path: Path
) -> None:
    """``phone --until`` stops at a refusal or a refund (``PLATFORM_REFUSALS``): the texts
    the platform really sends, so a change of them on one side fails here."""
    world = PhoneWorld(wallet, tmp_path)

    def pays_too_much(merchant: str, order_id: str, amount_fen: int) -> None:
        world.bank_app(merchant, order_id, amount_fen + 500)  # refunded: the wrong amount

    world.phone.pay = pays_too_much
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)
    world.settle()
    assert world.phone.outcome_refused() == "充值未完成，已退款 Refunded 35.00"
    world.phone.inbox.clear()
    world.screen.answers[:] = ["123456"]
    world.phone.select(5)  # report the card lost
    world.settle()
    world.screen.answers[:] = ["30", "123456"]
    world.phone.select(4)  # a lost card is not topped up
    world.settle()
    refused = world.phone.outcome_refused()
    assert refused is not None and refused.startswith("未受理 Refused:")
    world.bank.close()
