"""The bus POS: what a passenger, a driver and the platform see of a tap."""

from __future__ import annotations

from pathlib import Path

import pytest

from reader_sim.link import InMemoryLink, exchange
from reader_sim.pos import Outcome, Refusal
from sim_applet.apdu import SW
from sim_applet.crypto import Algorithm
from sim_applet.issuer import purchase_tac
from sim_applet.personalize import DEMO_ISSUER_KEYS
from sim_applet.structures import TRANSIT_AID, bcd_date, bcd_time, select_by_aid
from tests.helpers import (
    FARE_FEN,
    OPERATOR,
    Clock,
    load,
    new_card,
    new_driver_card,
    new_pos,
    purse,
    store_at,
)


@pytest.mark.parametrize("algorithm", [Algorithm.TDES, Algorithm.SM4])
def test_a_paid_tap_debits_the_fare_and_keeps_a_record_whose_tac_the_issuer_verifies(
    algorithm: Algorithm,
) -> None:
    card = new_card(algorithm=algorithm, balance_fen=1000)
    clock = Clock()
    pos = new_pos(clock=clock)

    outcome = pos.present(InMemoryLink(card))

    assert outcome.outcome is Outcome.PAID
    assert outcome.balance == purse(card).balance == 1000 - FARE_FEN
    record = outcome.record
    assert record is not None
    assert (record.balance_before, record.balance_after) == (1000, 1000 - FARE_FEN)
    assert (record.ctc, record.amount, record.algorithm) == (0, FARE_FEN, algorithm)
    assert (record.operator, record.route, record.vehicle, record.driver) == (
        OPERATOR,
        "12",
        "V-1201",
        "D007",
    )
    assert record.mac2_verified and not record.recovered
    assert record.tac == purchase_tac(
        DEMO_ISSUER_KEYS,
        algorithm,
        record.card_serial,
        amount=record.amount,
        transaction_type=record.transaction_type,
        terminal_id=record.terminal_id,
        terminal_seq=record.terminal_seq,
        date_bcd=bcd_date(clock.now),
        time_bcd=bcd_time(clock.now),
    )
    assert pos.store.records() == [record]


def test_no_driver_signed_in_refuses_the_tap_and_charges_nothing() -> None:
    card = new_card(balance_fen=1000)
    pos = new_pos(signed_in=False)
    outcome = pos.present(InMemoryLink(card))
    assert (outcome.outcome, outcome.refusal) == (Outcome.REFUSED, Refusal.NO_DRIVER)
    assert purse(card).balance == 1000 and pos.store.count() == 0


def test_the_driver_signs_in_and_out_with_the_same_card_and_both_are_recorded() -> None:
    pos = new_pos(signed_in=False)
    driver = InMemoryLink(new_driver_card())
    assert pos.present(driver).outcome is Outcome.SIGNED_IN
    assert pos.present(driver).outcome is Outcome.SIGNED_OUT
    assert pos.driver is None
    assert [event for _, event, _ in pos.store.sign_ins()] == ["sign_in", "sign_out"]


def test_a_driver_card_of_another_operator_or_with_a_forged_key_is_refused() -> None:
    pos = new_pos(signed_in=False)
    other = pos.present(InMemoryLink(new_driver_card(operator="OTHER-CO")))
    forged = pos.present(InMemoryLink(new_driver_card(driver_master_key=bytes.fromhex("AB" * 16))))
    for outcome in (other, forged):
        assert (outcome.outcome, outcome.refusal) == (
            Outcome.REFUSED,
            Refusal.DRIVER_CARD_INVALID,
        )
    assert pos.driver is None


def test_the_driver_stays_signed_in_across_a_pos_restart(tmp_path: Path) -> None:
    new_pos(store_at(tmp_path)).store.close()
    restarted = new_pos(store_at(tmp_path), signed_in=False)
    assert restarted.driver is not None and restarted.driver.driver_id == "D007"


def test_insufficient_balance_is_refused_and_nothing_changes() -> None:
    card = new_card(balance_fen=FARE_FEN - 1)
    pos = new_pos()
    outcome = pos.present(InMemoryLink(card))
    assert outcome.refusal is Refusal.INSUFFICIENT_FUNDS
    assert purse(card).balance == FARE_FEN - 1 and purse(card).offline_ctc == 0
    assert pos.store.count() == 0


def test_a_second_tap_inside_the_window_is_not_charged_and_one_after_it_is() -> None:
    card = new_card(balance_fen=1000)
    clock = Clock()
    pos = new_pos(clock=clock, repeat_tap_window_s=10)
    link = InMemoryLink(card)
    assert pos.present(link).outcome is Outcome.PAID
    clock.advance(seconds=9)
    assert pos.present(link).outcome is Outcome.ALREADY_PAID
    clock.advance(seconds=1)
    assert pos.present(link).outcome is Outcome.PAID
    assert purse(card).balance == 1000 - 2 * FARE_FEN


def test_a_blacklisted_card_is_blocked_refused_and_stays_blocked() -> None:
    card = new_card(balance_fen=1000)
    pos = new_pos(blacklist={purse(card).serial})
    link = InMemoryLink(card)

    assert pos.present(link).refusal is Refusal.BLACKLISTED
    assert purse(card).blocked and purse(card).balance == 1000
    assert exchange(link, select_by_aid(TRANSIT_AID))[1] == SW.SELECTED_APPLICATION_BLOCKED
    assert new_pos().present(link).refusal is Refusal.CARD_BLOCKED


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"expiry_date": Clock().now.date().replace(year=2025)}, Refusal.EXPIRED),
        ({"start_date": Clock().now.date().replace(year=2027)}, Refusal.NOT_YET_VALID),
    ],
)
def test_a_card_outside_its_validity_is_refused(options: dict, refusal: Refusal) -> None:
    card = new_card(balance_fen=1000, **options)
    assert new_pos().present(InMemoryLink(card)).refusal is refusal
    assert purse(card).balance == 1000


def test_a_full_record_store_refuses_taps_rather_than_drop_a_record(tmp_path: Path) -> None:
    pos = new_pos(store_at(tmp_path, records_max=1), repeat_tap_window_s=0)
    card = new_card(balance_fen=1000)
    assert pos.present(InMemoryLink(card)).outcome is Outcome.PAID
    assert pos.present(InMemoryLink(card)).refusal is Refusal.STORE_FULL
    assert purse(card).balance == 1000 - FARE_FEN
    record = pos.store.records()[0]
    pos.store.acknowledge(record.terminal_id, [record.terminal_seq])
    assert pos.present(InMemoryLink(card)).outcome is Outcome.PAID


def test_the_terminal_sequence_never_repeats_across_restarts(tmp_path: Path) -> None:
    card = new_card(balance_fen=1000)
    first = new_pos(store_at(tmp_path), repeat_tap_window_s=0)
    first.present(InMemoryLink(card))
    first.store.close()
    second = new_pos(store_at(tmp_path), repeat_tap_window_s=0)
    second.present(InMemoryLink(card))
    assert [r.terminal_seq for r in second.store.records()] == [1, 2]


def test_a_card_loaded_at_the_counter_pays_on_the_bus() -> None:
    card = new_card()
    load(card, 5000)
    outcome = new_pos().present(InMemoryLink(card))
    assert outcome.outcome is Outcome.PAID and outcome.balance == 5000 - FARE_FEN
