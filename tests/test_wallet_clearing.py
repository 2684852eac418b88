"""Clearing and settlement of a business day, from real cards tapped on real POS models."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from reader_sim.link import InMemoryLink
from reader_sim.platform_client import PlatformClient
from reader_sim.pos import BusPos, Outcome
from reader_sim.pos_file import open_pos
from reader_sim.uploader import Uploader
from sim_applet.sim import Sim
from tests.helpers import Clock, new_card, new_driver_card
from tests.wallet_fixtures import BusCompany, FlaskTransport, Wallet, set_up_bus_company
from wallet_service.models import Transfer

DAY = "2026-11-25"


class Bus:
    """A provisioned POS on the bus company's vehicle, driver signed in."""

    def __init__(
        self, wallet: Wallet, company: BusCompany, tmp_path: Path, clock: Clock, name: str = "a"
    ) -> None:
        config = json.loads(company.psam_file.read_text())
        config["record_store"] = str(tmp_path / f"pos-{name}.sqlite")
        config["repeat_tap_window_s"] = 0
        path = tmp_path / f"pos-{name}.json"
        path.write_text(json.dumps(config))
        self.pos: BusPos = open_pos(path, clock=clock)
        self.pos.present(InMemoryLink(new_driver_card(operator="BUS1")))
        self.wallet, self.company = wallet, company

    def tap(self, card: Sim) -> None:
        outcome = self.pos.present(InMemoryLink(card))
        assert outcome.outcome is Outcome.PAID, outcome

    def records(self) -> list[dict]:
        return [r.to_json() for r in self.pos.store.records()]

    def upload(self, records: list[dict] | None = None) -> dict:
        if records is None:
            Uploader(
                self.pos.store,
                PlatformClient(FlaskTransport(self.wallet), self.company.pos_token),
                self.pos.terminal_id,
            ).upload_all()
            return {}
        return self.wallet.ok(
            "POST", "/api/v1/pos/records", self.company.pos_token, {"records": records}
        )


def clear(wallet: Wallet, day: str = DAY) -> dict:
    return wallet.ok("POST", "/api/v1/clearing/runs", body={"date": day}, status=201)


def report(wallet: Wallet, day: str = DAY) -> dict:
    return wallet.ok("GET", f"/api/v1/clearing/days/{day}")


def balances(wallet: Wallet) -> dict[str, int]:
    answer = wallet.ok("GET", "/api/v1/ledger")
    assert answer["balanced"]
    return {a["code"]: a["credits_fen"] - a["debits_fen"] for a in answer["accounts"]}


def test_a_day_is_cleared_by_dimension_and_settled_less_the_fee(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)  # fee 150 bp
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    cards = [new_card(i, balance_fen=5000, seed=i) for i in (1, 2)]
    for _ in range(3):
        for card in cards:
            clock.advance(minutes=10)
            bus.tap(card)
    bus.upload()

    run = clear(wallet)
    day = report(wallet)

    assert (run["records"], run["paid_records"], run["paid_fen"]) == (6, 6, 1200)
    assert run["exceptions"] == {}
    assert day["totals"] == [
        {
            "operator": "BUS1",
            "fleet": "F1",
            "route": "12",
            "vehicle": "V1201",
            "driver": "D007",
            "adjustment": False,
            "records": 6,
            "amount_fen": 1200,
        }
    ]
    statement = wallet.ok("GET", f"/api/v1/operators/BUS1/settlements/{DAY}", company.staff_token)[
        "statements"
    ]
    assert statement == [
        {
            "run_id": run["run_id"],
            "records": 6,
            "gross_fen": 1200,
            "adjustments_fen": 0,
            "fee_rate_bp": 150,
            "fee_fen": 18,
            "net_fen": 1182,
        }
    ]
    books = balances(wallet)
    assert books["operator_payable:BUS1"] == 1182 and books["fees:platform"] == 18
    assert books["card_float:00000000000000000001"] == -600


def test_re_running_a_day_posts_nothing_twice_and_reports_the_same(
    wallet: Wallet, tmp_path
) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    bus.tap(new_card(1, balance_fen=5000))
    bus.upload()
    clear(wallet)
    first = report(wallet)
    with wallet.database.transaction() as session:
        transfers = session.scalar(select(func.count()).select_from(Transfer))

    again = clear(wallet)

    assert (again["records"], again["paid_fen"]) == (0, 0)
    second = report(wallet)
    assert second["totals"] == first["totals"] and second["paid_fen"] == first["paid_fen"]
    with wallet.database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Transfer)) == transfers


def test_a_forged_tac_is_not_paid_and_is_reported_with_its_device(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    bus.tap(new_card(1, balance_fen=5000))
    bus.tap(new_card(2, balance_fen=5000))
    good, forged = bus.records()
    forged["tac"] = "%08X" % (int(forged["tac"], 16) ^ 1)
    bus.upload([good, forged])

    run = clear(wallet)

    assert (run["paid_records"], run["paid_fen"], run["exceptions"]) == (1, 200, {"bad_tac": 1})
    exception = report(wallet)["exceptions"][0]
    assert exception["card_serial"] == "00000000000000000002"
    assert exception["details"] == {"device": company.terminal_id, "suspected": "fraud"}


def test_a_cloned_card_shows_as_a_duplicate_ctc_and_is_paid_once(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    card = new_card(1, balance_fen=5000)
    clone = copy.deepcopy(card)
    bus.tap(card)
    clock.advance(minutes=1)
    bus.tap(clone)  # same serial, same keys, same CTC 0: both TACs are valid
    bus.upload()

    run = clear(wallet)

    assert (run["paid_records"], run["exceptions"]) == (1, {"duplicate": 1})


def second_bus(wallet: Wallet, company: BusCompany, tmp_path: Path, clock: Clock) -> Bus:
    device = wallet.ok(
        "POST",
        "/api/v1/operators/BUS1/pos-devices",
        company.staff_token,
        {"terminal_id": "000012000002", "vehicle": "V1201"},
    )
    perso = Path(wallet.app.config["PERSONALIZATION_DIR"])
    other = BusCompany(
        company.staff_token,
        company.counter_token,
        device["token"],
        device["terminal_id"],
        perso / device["psam_file"],
    )
    return Bus(wallet, other, tmp_path, clock, "b")


def test_a_ctc_gap_is_reported_and_the_late_record_is_an_adjustment_next_day(
    wallet: Wallet, tmp_path
) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus_a = Bus(wallet, company, tmp_path, clock)
    bus_b = second_bus(wallet, company, tmp_path, clock)
    card = new_card(1, balance_fen=5000)
    for bus in (bus_a, bus_b, bus_a):
        clock.advance(minutes=30)
        bus.tap(card)
    bus_a.upload()  # bus B is out of GPRS coverage until tomorrow

    first = clear(wallet)

    assert (first["exceptions"], first["paid_records"]) == ({"ctc_gap": 1}, 2)
    gap = report(wallet)["exceptions"][0]
    assert gap["details"] == {"missing_ctcs": [1, 1], "last_device": company.terminal_id}

    bus_b.upload()
    late = clear(wallet, "2026-11-26")

    assert (late["paid_records"], late["exceptions"]) == (1, {})  # fills the gap: no duplicate
    totals = report(wallet, "2026-11-26")["totals"]
    assert [(t["adjustment"], t["records"], t["amount_fen"]) for t in totals] == [(True, 1, 200)]
    statement = wallet.ok(
        "GET", "/api/v1/operators/BUS1/settlements/2026-11-26", company.staff_token
    )["statements"][0]
    assert (statement["gross_fen"], statement["adjustments_fen"]) == (200, 200)
    assert report(wallet)["paid_fen"] == 400  # the first day's report is unchanged


def test_a_broken_balance_chain_is_reported_but_paid(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    card = new_card(1, balance_fen=5000)
    for _ in range(2):
        clock.advance(minutes=20)
        bus.tap(card)
    first, second = bus.records()
    second["balance_before"] += 100  # the POS misreports: the TAC does not cover balances
    bus.upload([first, second])

    run = clear(wallet)

    assert (run["paid_records"], run["exceptions"]) == (2, {"balance_break": 1})
    details = report(wallet)["exceptions"][0]["details"]
    assert details["expected_before_fen"] == 4800 and details["found_before_fen"] == 4900


def test_repeated_anomalies_hot_list_the_card(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus = Bus(wallet, company, tmp_path, clock)
    card = new_card(1, balance_fen=5000)
    for _ in range(4):
        clock.advance(minutes=20)
        bus.tap(card)
    records = bus.records()
    for record in records[1:]:
        record["balance_before"] += 1
    bus.upload(records)

    run = clear(wallet)

    assert run["exceptions"] == {"balance_break": 3}
    assert run["hot_listed"] == ["00000000000000000001"]
    blacklist = wallet.ok("GET", "/api/v1/pos/blacklist", company.pos_token)
    assert "00000000000000000001" in blacklist["add"]
