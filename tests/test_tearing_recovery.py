"""Card-application.md §5 from the readers' side: a phone pulled away at any step of a
payment or a load is charged (or credited) exactly once, and every fen is accounted for."""

from __future__ import annotations

from pathlib import Path

import pytest

from reader_sim.link import InMemoryLink
from reader_sim.load_terminal import Loaded, LoadInterrupted, LoadRefused, LoadTerminal
from reader_sim.pos import Outcome
from sim_applet.personalize import DEMO_ISSUER_KEYS
from tests.helpers import COUNTER_TERMINAL_ID, FARE_FEN, Clock, new_card, new_pos, purse, store_at

DEBIT = 0x54
CREDIT = 0x52


def _steps_of(ins: int, run) -> int:  # type: ignore[no-untyped-def]
    """How many internal steps the command takes when nothing tears."""
    card = new_card(balance_fen=1000)
    steps = []
    original = card.transmit

    def spy(command: bytes) -> bytes:
        answer = original(command)
        if command[1] == ins:
            steps.append(card.last_command_steps)
        return answer

    card.transmit = spy  # type: ignore[method-assign]
    run(card)
    assert steps, "the command never ran"
    return steps[0]


DEBIT_STEPS = _steps_of(DEBIT, lambda card: new_pos().present(InMemoryLink(card)))


@pytest.mark.parametrize("cut_after", range(1, DEBIT_STEPS + 1))
@pytest.mark.parametrize("restart_pos", [False, True], ids=["same-pos", "pos-restarted"])
def test_a_torn_payment_is_charged_once_when_the_phone_comes_back(
    cut_after: int, restart_pos: bool, tmp_path: Path
) -> None:
    card = new_card(balance_fen=1000)
    clock = Clock()
    pos = new_pos(store_at(tmp_path), clock=clock)
    link = InMemoryLink(card)
    card.cut_power_after(cut_after, during_ins=DEBIT)

    assert pos.present(link).outcome is Outcome.CARD_REMOVED
    if restart_pos:
        pos.store.close()
        pos = new_pos(store_at(tmp_path), clock=clock, signed_in=False)
    link.present_card()
    clock.advance(seconds=2)
    again = pos.present(link)

    assert again.outcome in (Outcome.PAID, Outcome.RECOVERED)
    records = pos.store.records()
    assert len(records) == 1 and pos.store.pending() == []
    assert purse(card).balance == 1000 - FARE_FEN == records[0].balance_after
    assert purse(card).offline_ctc == 1
    if again.outcome is Outcome.RECOVERED:
        assert records[0].recovered and records[0].tac == again.record.tac  # type: ignore[union-attr]


def test_a_torn_payment_then_a_ride_on_another_bus_is_still_resolved(tmp_path: Path) -> None:
    card = new_card(balance_fen=1000)
    clock = Clock()
    pos = new_pos(store_at(tmp_path), clock=clock)
    link = InMemoryLink(card)
    card.cut_power_after(DEBIT_STEPS, during_ins=DEBIT)  # the debit committed
    assert pos.present(link).outcome is Outcome.CARD_REMOVED
    link.present_card()
    clock.advance(minutes=5)
    other_bus = new_pos(clock=clock, terminal_id=bytes.fromhex("000012000099"))
    assert other_bus.present(link).outcome is Outcome.PAID
    clock.advance(minutes=30)

    back = pos.present(link)

    assert back.outcome is Outcome.RECOVERED
    assert purse(card).balance == 1000 - 2 * FARE_FEN
    assert len(pos.store.records()) + len(other_bus.store.records()) == 2


def test_a_payment_torn_before_the_card_committed_is_forgotten_and_charged_anew() -> None:
    card = new_card(balance_fen=1000)
    pos = new_pos()
    link = InMemoryLink(card)
    card.cut_power_after(1, during_ins=DEBIT)
    pos.present(link)
    assert len(pos.store.pending()) == 1
    link.present_card()
    assert pos.present(link).outcome is Outcome.PAID
    assert pos.store.pending() == [] and len(pos.store.records()) == 1
    assert purse(card).balance == 1000 - FARE_FEN


def _load_steps() -> int:
    def run(card):  # type: ignore[no-untyped-def]
        LoadTerminal(DEMO_ISSUER_KEYS, COUNTER_TERMINAL_ID, Clock()).load(InMemoryLink(card), 1)

    return _steps_of(CREDIT, run)


@pytest.mark.parametrize("cut_after", range(1, _load_steps() + 1))
def test_a_torn_load_is_recovered_as_loaded_or_not_loaded_never_twice(cut_after: int) -> None:
    card = new_card(balance_fen=100)
    terminal = LoadTerminal(DEMO_ISSUER_KEYS, COUNTER_TERMINAL_ID, Clock())
    link = InMemoryLink(card)
    card.cut_power_after(cut_after, during_ins=CREDIT)

    interrupted = terminal.load(link, 500)
    assert isinstance(interrupted, LoadInterrupted)
    link.present_card()
    result = terminal.recover(link, interrupted)

    if isinstance(result, Loaded):
        assert purse(card).balance == result.balance_after == 600
        assert purse(card).online_ctc == 1
    else:
        assert isinstance(result, LoadRefused) and result.reason == "the load did not happen"
        assert purse(card).balance == 100 and purse(card).online_ctc == 0
