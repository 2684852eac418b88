"""An over-the-air top-up with real secured packets: platform → SMS centre → phone → SIM
(its OTA security domain) → PoR → SMS centre → platform, under duplicated SMS and replay."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

from otar.keys import demo_keyset
from otar.sim_side import OtaSecurityDomain
from reader_sim.smsc import Faults, SmsCentre
from tests.helpers import Clock, purse
from tests.test_wallet_topups import PHONE, World
from tests.wallet_fixtures import Wallet
from wallet_service.ota_channel import (
    SmsOtaChannel,
    committed_then_sent,
    handle_incoming_sms,
    keyset_lookup,
)
from wallet_service.services import topups
from wallet_service.sms_gateway import InProcessGateway

SHORT_CODE = "10658888"
ICCID = "8986001234567890123"


class OtaWorld(World):
    def __init__(self, wallet: Wallet, tmp_path: Path, faults: Faults) -> None:
        super().__init__(wallet, tmp_path)
        self.smsc = SmsCentre(faults, clock=Clock(), random=random.Random(3))
        self.gateway = InProcessGateway(self.smsc, SHORT_CODE)
        self.domain = OtaSecurityDomain({1: demo_keyset(ICCID)})
        self.replayable: list[bytes] = []

    def channel_in(self, ctx):  # type: ignore[no-untyped-def]
        masters = ctx.keys.ota_masters()
        return SmsOtaChannel(self.gateway, keyset_lookup(ctx, masters))

    def _committed_then_sent(self, work):  # type: ignore[no-untyped-def]
        return committed_then_sent(self.run, self.channel_in, work)

    def work(self) -> str | None:
        result = self._committed_then_sent(lambda ctx, box: topups.work_once(ctx, box, self.bank))
        return None if result is None else result.action

    def phone_handles_sms(self) -> int:
        """The phone hands each command packet to its SIM (SMS-PP download) and sends the
        PoR back to the platform's short code."""
        handled = 0
        for sms in self.smsc.collect(PHONE):
            self.replayable.append(sms.user_data)
            por = self.domain.process(sms.user_data, self._run_on_sim)
            if por:
                self.smsc.submit(PHONE, SHORT_CODE, por[3:], udh=por[:3])
            handled += 1
        return handled

    def _run_on_sim(self, tar: bytes, apdus: list[bytes]) -> list[bytes]:
        return [self.sim.transmit(apdu) for apdu in apdus]

    def platform_reads_sms(self) -> list[str]:
        return [
            self._committed_then_sent(lambda ctx, box, sms=sms: handle_incoming_sms(ctx, box, sms))
            for sms in self.gateway.receive()
        ]


def make(wallet: Wallet, tmp_path: Path, **faults: float) -> OtaWorld:
    world = OtaWorld(wallet, tmp_path, Faults(**faults))  # type: ignore[arg-type]
    assert world.sim.iccid == ICCID
    return world


def test_a_top_up_over_secured_sms(wallet: Wallet, tmp_path: Path) -> None:
    world = make(wallet, tmp_path)
    reference = world.order(3000)
    world.pay(reference)
    assert world.work() == "packet 1 sent"
    world.phone_handles_sms()
    assert world.platform_reads_sms() == ["packet 2 sent"]
    world.phone_handles_sms()
    assert world.platform_reads_sms() == ["loaded"]
    assert purse(world.sim).balance == 3000 and world.state(reference) == "loaded"
    assert world.books()[f"card_float:{world.serial}"] == 3000
    world.bank.close()


def test_duplicated_sms_and_a_replayed_packet_load_once(wallet: Wallet, tmp_path: Path) -> None:
    world = make(wallet, tmp_path, duplicate_rate=1.0)
    reference = world.order(3000)
    world.pay(reference)
    world.work()
    world.phone_handles_sms()  # the copy is refused by the SIM's counter check
    answers = world.platform_reads_sms()
    assert "packet 2 sent" in answers and any(a.startswith("refused by the SIM") for a in answers)
    world.phone_handles_sms()
    assert "loaded" in world.platform_reads_sms()
    for packet in world.replayable:  # an attacker replays every packet it saw
        world.domain.process(packet, world._run_on_sim)
    assert purse(world.sim).balance == 3000
    assert world.books()[f"card_float:{world.serial}"] == 3000
    world.bank.close()


@pytest.mark.parametrize("seed", range(3))
def test_lossy_sms_end_loaded_once_or_refunded(wallet: Wallet, tmp_path: Path, seed: int) -> None:
    world = make(wallet, tmp_path, loss_rate=0.4)
    world.smsc.random = random.Random(seed)
    reference = world.order(3000)
    world.pay(reference)
    for _ in range(40):
        world.work()
        world.phone_handles_sms()
        world.platform_reads_sms()
        if world.state(reference) in ("loaded", "refunded"):
            break
        world.later(topups.por_timeout_s * 64)
    state = world.state(reference)
    balance = purse(world.sim).balance
    assert (state, balance) in (("loaded", 3000), ("refunded", 0)), (state, balance)
    books = world.books()
    assert books.get(f"card_float:{world.serial}", 0) == balance
    world.bank.close()


def test_the_worker_loop_takes_an_order_to_loaded(wallet: Wallet, tmp_path: Path) -> None:
    from wallet_service.worker import run_once

    world = make(wallet, tmp_path)
    reference = world.order(3000)
    world.bank.pay("BUSCARD", reference, 3000, "6222020000000001")

    def post(url: str, payload: str, headers: dict[str, str]) -> int:
        return (
            wallet.client().post("/api/v1/bank/webhooks", data=payload, headers=headers).status_code
        )

    from reader_sim.bank import deliver_due

    deliver_due(world.bank, world.secret, post)
    first = run_once(wallet.app, world.gateway, world.bank)
    assert (first.bank_events, first.steps) == (1, 1)  # paid → packet 1
    world.phone_handles_sms()
    run_once(wallet.app, world.gateway, world.bank)  # PoR 1 → packet 2
    world.phone_handles_sms()
    run_once(wallet.app, world.gateway, world.bank)  # PoR 2 → loaded
    assert world.state(reference) == "loaded" and purse(world.sim).balance == 3000
    world.bank.close()


class _Killed(Exception):
    """The worker process dies: its transaction never commits."""


@pytest.mark.parametrize("before_sending", [False, True], ids=["after-send", "before-send"])
@pytest.mark.parametrize("kill_at_send", [1, 2, 3])
def test_a_worker_killed_at_any_step_leaves_the_next_one_to_finish(
    wallet: Wallet, tmp_path: Path, kill_at_send: int, before_sending: bool
) -> None:
    """The real worker loop (``run_once``) with a gateway that dies on its n-th send —
    just before the SMS leaves, or just after."""
    from reader_sim.bank import deliver_due
    from wallet_service.worker import run_once

    world = make(wallet, tmp_path)
    reference = world.order(3000)
    world.bank.pay("BUSCARD", reference, 3000, "6222020000000001")
    deliver_due(
        world.bank,
        world.secret,
        lambda url, payload, headers: (
            wallet.client().post("/api/v1/bank/webhooks", data=payload, headers=headers).status_code
        ),
    )
    sends = 0

    class Dying(InProcessGateway):
        """Dies at the n-th SMS, however it leaves (alone or in a batch)."""

        def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
            self.send_many([(to, user_data, udh)])

        def send_many(self, messages: list[tuple[str, bytes, bytes]]) -> None:
            nonlocal sends
            for message in messages:
                sends += 1
                if sends == kill_at_send and before_sending:
                    raise _Killed
                super().send_many([message])
                if sends == kill_at_send:
                    raise _Killed

    gateway = Dying(world.smsc, SHORT_CODE)
    for _ in range(12):
        with contextlib.suppress(_Killed):  # the worker is gone; the next pass is a new one
            run_once(wallet.app, gateway, world.bank)
        world.phone_handles_sms()
        if world.state(reference) == "loaded":
            break
        world.later(topups.por_timeout_s)
    assert sends >= kill_at_send  # the worker did die there
    assert world.state(reference) == "loaded" and purse(world.sim).balance == 3000
    assert world.books()[f"card_float:{world.serial}"] == 3000
    world.bank.close()
