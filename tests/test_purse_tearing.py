"""card-application.md §5, anti-tearing: the phone leaves the field after any internal step
of any state-changing command, and the card is either exactly untouched or fully done
(balance, CTC, log record and proof together). A PIN try is never given back by tearing."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from sim_applet.apdu import SW, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.sim import Sim
from sim_applet.structures import (
    APPLICATION_UNBLOCK_HEADER,
    TYPE_CAPP_PURCHASE,
    TYPE_LOAD,
    TYPE_PURCHASE,
    get_transaction_prove,
    select_by_aid,
    verify_pin,
)
from tests.card_helpers import (
    PIN,
    TRANSIT_AID,
    maintenance_command,
    new_psam,
    new_sim,
    ok,
    prepare_load,
    prepare_purchase,
    send,
    snapshot,
    state_of,
)

WRONG_PIN = bytes.fromhex("999999")
NEW_PIN = bytes.fromhex("2468")
STATION = bytes.fromhex("00010203040506070809")


def change_pin(old: bytes, new: bytes) -> bytes:
    return CommandApdu(0x80, 0x5E, 0x01, 0x00, old + b"\xff" + new).encode()


@dataclass(frozen=True)
class Scenario:
    """A fresh card brought to just before one state-changing command."""

    name: str
    algorithm: Algorithm
    prepare: Callable[[Sim], bytes]  # runs the preliminaries, returns the command to tear
    checks_pin: bool = False  # counts a PIN try before comparing (see test docstrings)

    def start(self) -> tuple[Sim, bytes]:
        sim = new_sim(algorithm=self.algorithm, balance_fen=1000)
        return sim, self.prepare(sim)


def _credit(sim: Sim) -> bytes:
    return prepare_load(sim, 500).credit.command().encode()


def _debit(sim: Sim) -> bytes:
    return prepare_purchase(sim, new_psam(), 150).debit.command().encode()


def _capp_debit(sim: Sim) -> bytes:
    prepared = prepare_purchase(sim, new_psam(), 150, capp=True, capp_update=(1, STATION))
    return prepared.debit.command().encode()


def _verify_wrong(sim: Sim) -> bytes:
    return verify_pin(WRONG_PIN).encode()


def _verify_right_after_a_wrong_try(sim: Sim) -> bytes:
    assert send(sim, verify_pin(WRONG_PIN))[1] == 0x63C2
    return verify_pin(PIN).encode()


def _verify_right(sim: Sim) -> bytes:
    return verify_pin(PIN).encode()


def _change_pin(sim: Sim) -> bytes:
    return change_pin(PIN, NEW_PIN)


def _change_pin_wrong_old(sim: Sim) -> bytes:
    return change_pin(WRONG_PIN, NEW_PIN)


def _block(sim: Sim) -> bytes:
    return maintenance_command(sim).encode()


def _unblock(sim: Sim) -> bytes:
    ok(sim, maintenance_command(sim))
    return maintenance_command(sim, APPLICATION_UNBLOCK_HEADER).encode()


SCENARIOS = [
    Scenario("credit-for-load-3des", Algorithm.TDES, _credit),
    Scenario("credit-for-load-sm4", Algorithm.SM4, _credit),
    Scenario("debit-for-purchase-3des", Algorithm.TDES, _debit),
    Scenario("debit-for-purchase-sm4", Algorithm.SM4, _debit),
    Scenario("capp-debit-with-cache", Algorithm.TDES, _capp_debit),
    Scenario("verify-pin-wrong", Algorithm.TDES, _verify_wrong, checks_pin=True),
    Scenario("verify-pin-right", Algorithm.TDES, _verify_right, checks_pin=True),
    Scenario(
        "verify-pin-right-after-a-wrong-try",
        Algorithm.TDES,
        _verify_right_after_a_wrong_try,
        checks_pin=True,
    ),
    Scenario("change-pin", Algorithm.TDES, _change_pin, checks_pin=True),
    Scenario("change-pin-wrong-old", Algorithm.TDES, _change_pin_wrong_old, checks_pin=True),
    Scenario("application-block", Algorithm.TDES, _block),
    Scenario("application-unblock", Algorithm.SM4, _unblock),
]


@dataclass(frozen=True)
class Untorn:
    command: bytes
    answer: bytes
    steps: int
    before: dict[str, Any]
    done: dict[str, Any]


def _untorn(scenario: Scenario) -> Untorn:
    sim, command = scenario.start()
    before = snapshot(sim)
    answer = sim.transmit(command)
    assert answer, "an untorn command answers"
    return Untorn(command, answer, sim.last_command_steps, before, snapshot(sim))


UNTORN = {scenario.name: _untorn(scenario) for scenario in SCENARIOS}
CUTS = [
    pytest.param(scenario, k, id=f"{scenario.name}-cut{k}")
    for scenario in SCENARIOS
    for k in range(1, UNTORN[scenario.name].steps + 1)
]


def _one_try_counted(image: dict[str, Any]) -> dict[str, Any]:
    purse = dict(image["applications"][0])
    purse["pin_tries_left"] -= 1
    return {**image, "applications": [purse]}


def _torn(scenario: Scenario, k: int) -> tuple[Sim, dict[str, Any], dict[str, Any]]:
    """Run the scenario with the power cut after step k: (card, before, after)."""
    sim, command = scenario.start()
    assert command == UNTORN[scenario.name].command, "scenarios must be deterministic"
    before = snapshot(sim)
    sim.cut_power_after(k)
    assert sim.transmit(command) == b""
    assert not sim.powered
    return sim, before, snapshot(sim)


def test_every_state_changing_command_changes_the_card_when_not_torn() -> None:
    for name, untorn in UNTORN.items():
        if name != "verify-pin-right":  # the one whose completed state is the start state
            assert untorn.done != untorn.before, name
        assert untorn.steps >= 3, name


@pytest.mark.parametrize(("scenario", "k"), CUTS)
def test_a_cut_leaves_the_card_untouched_or_fully_done(scenario: Scenario, k: int) -> None:
    """Whole persistent images compared: balance, CTCs, log, proofs, compound records,
    PIN, tries and the blocked flag move together or not at all. A PIN check counts its
    try in its own atomic write before comparing (so that tearing cannot buy a free
    guess); a cut after that write and before the outcome leaves that one try counted,
    which is the third state allowed to PIN-checking commands."""
    untorn = UNTORN[scenario.name]
    _, before, after = _torn(scenario, k)
    assert before == untorn.before
    allowed = [untorn.before, untorn.done]
    if scenario.checks_pin:
        allowed.append(_one_try_counted(untorn.before))
    assert after in allowed


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if not s.checks_pin], ids=str)
def test_money_and_maintenance_commands_have_a_single_commit_point(scenario: Scenario) -> None:
    untorn = UNTORN[scenario.name]
    outcomes = []
    for k in range(1, untorn.steps + 1):
        _, _, after = _torn(scenario, k)
        outcomes.append("done" if after == untorn.done else "untouched")
    first_done = outcomes.index("done")
    assert outcomes == ["untouched"] * first_done + ["done"] * (untorn.steps - first_done)
    assert first_done >= 1, "the first step must not already have written"


_PROOF_OF = {
    "credit-for-load-3des": TYPE_LOAD,
    "credit-for-load-sm4": TYPE_LOAD,
    "debit-for-purchase-3des": TYPE_PURCHASE,
    "debit-for-purchase-sm4": TYPE_PURCHASE,
    "capp-debit-with-cache": TYPE_CAPP_PURCHASE,
}


@pytest.mark.parametrize(
    ("scenario", "k"),
    [cut for cut in CUTS if cut.values[0].name in _PROOF_OF],  # type: ignore[union-attr]
)
def test_after_a_cut_the_proof_is_there_exactly_when_the_money_moved(
    scenario: Scenario, k: int
) -> None:
    """§5: the reader comes back, compares the CTC and asks GET TRANSACTION PROVE; a done
    transaction proves with the MAC2 and TAC the lost answer would have carried."""
    untorn = UNTORN[scenario.name]
    sim, _, after = _torn(scenario, k)
    sim.power_on()
    ok(sim, select_by_aid(TRANSIT_AID))
    state = state_of(sim)
    transaction_type = _PROOF_OF[scenario.name]
    ctc_after = state.online_ctc if transaction_type == TYPE_LOAD else state.offline_ctc
    data, sw = send(sim, get_transaction_prove(transaction_type, ctc_after))
    if after == untorn.done:
        assert sw == SW.OK
        if transaction_type == TYPE_LOAD:
            assert data[4:] == untorn.answer[:4]  # the TAC
            assert data[:4] == untorn.command[12:16]  # the host's MAC2
        else:
            tac, mac2 = untorn.answer[:4], untorn.answer[4:8]
            assert data == mac2 + tac
    else:
        assert sw == SW.CONDITIONS_NOT_SATISFIED


# --- PIN tries ----------------------------------------------------------------------------------


class _ComparisonSpy:
    """Stands in for ``hmac`` inside the purse: records the NVM try counter at the moment
    the card compares a PIN."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.tries_at_comparison: list[int] = []

    def compare_digest(self, a: bytes, b: bytes) -> bool:
        if b == state_of(self.sim).pin:
            self.tries_at_comparison.append(state_of(self.sim).pin_tries_left)
        return hmac.compare_digest(a, b)


def _spy_on_pin_comparisons(monkeypatch: pytest.MonkeyPatch, sim: Sim) -> _ComparisonSpy:
    spy = _ComparisonSpy(sim)
    monkeypatch.setattr("sim_applet.purse.hmac", SimpleNamespace(compare_digest=spy.compare_digest))
    return spy


@pytest.mark.parametrize("pin", [WRONG_PIN, PIN], ids=["wrong", "right"])
def test_the_try_is_counted_in_nvm_before_the_pin_is_compared(
    monkeypatch: pytest.MonkeyPatch, pin: bytes
) -> None:
    sim = new_sim()
    spy = _spy_on_pin_comparisons(monkeypatch, sim)
    sim.transmit(verify_pin(pin).encode())
    assert spy.tries_at_comparison == [2]


WRONG_VERIFY = next(s for s in SCENARIOS if s.name == "verify-pin-wrong")


@pytest.mark.parametrize("k", range(1, UNTORN[WRONG_VERIFY.name].steps + 1))
def test_tearing_a_wrong_verify_never_gives_the_try_back(
    monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    sim, command = WRONG_VERIFY.start()
    spy = _spy_on_pin_comparisons(monkeypatch, sim)
    tries_before = state_of(sim).pin_tries_left
    sim.cut_power_after(k)
    assert sim.transmit(command) == b""
    tries_after = state_of(sim).pin_tries_left
    completed_wrong_try = UNTORN[WRONG_VERIFY.name].done["applications"][0]["pin_tries_left"]
    assert tries_after in (tries_before, completed_wrong_try)
    if spy.tries_at_comparison:  # the card looked at the PIN: the try stays spent
        assert tries_after == completed_wrong_try


def test_repeated_torn_guesses_cannot_outnumber_the_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attacker tearing every wrong VERIFY at every step gets at most 3 comparisons."""
    sim = new_sim()
    spy = _spy_on_pin_comparisons(monkeypatch, sim)
    steps = UNTORN[WRONG_VERIFY.name].steps
    for _round in range(5):
        for k in range(1, steps + 1):
            sim.power_on()
            sim.transmit(select_by_aid(TRANSIT_AID).encode())
            sim.cut_power_after(k)
            sim.transmit(verify_pin(WRONG_PIN).encode())
    assert len(spy.tries_at_comparison) <= 3
    assert state_of(sim).pin_tries_left == 0
