"""Statistics, record queries and CSV downloads for a bus company's staff."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

from tests.helpers import Clock, new_card
from tests.test_wallet_clearing import Bus, second_bus
from tests.wallet_fixtures import Wallet, set_up_bus_company


def busy_day(wallet: Wallet, tmp_path):  # type: ignore[no-untyped-def]
    company = set_up_bus_company(wallet)
    clock = Clock(datetime(2026, 11, 25, 7, 0))
    bus_a = Bus(wallet, company, tmp_path, clock)
    bus_b = second_bus(wallet, company, tmp_path, clock)
    cards = [new_card(i, balance_fen=5000, seed=i) for i in range(1, 4)]
    for hour in range(3):
        clock.now = datetime(2026, 11, 25, 7 + hour, 5)
        for card in cards:
            clock.advance(minutes=1)
            (bus_a if hour < 2 else bus_b).tap(card)
    bus_a.upload()
    bus_b.upload()
    return company


def test_rides_and_revenue_by_hour_and_by_vehicle(wallet: Wallet, tmp_path) -> None:
    company = busy_day(wallet, tmp_path)
    by_hour = wallet.ok(
        "GET",
        "/api/v1/operators/BUS1/stats?by=hour&from=2026-11-25&to=2026-11-25",
        company.staff_token,
    )
    assert by_hour["rows"] == [{"key": h, "rides": 3, "revenue_fen": 600} for h in ("7", "8", "9")]
    by_day = wallet.ok("GET", "/api/v1/operators/BUS1/stats?by=day", company.staff_token)
    assert by_day["rows"] == [{"key": "2026-11-25", "rides": 9, "revenue_fen": 1800}]
    by_route = wallet.ok("GET", "/api/v1/operators/BUS1/stats?by=route", company.staff_token)
    assert by_route["rows"] == [{"key": "12", "rides": 9, "revenue_fen": 1800}]
    empty = wallet.ok(
        "GET", "/api/v1/operators/BUS1/stats?by=driver&from=2026-11-26", company.staff_token
    )
    assert empty["rows"] == []
    assert (
        wallet.call("GET", "/api/v1/operators/BUS1/stats?by=colour", company.staff_token)[0] == 422
    )


def test_records_page_through_with_filters(wallet: Wallet, tmp_path) -> None:
    company = busy_day(wallet, tmp_path)
    base = "/api/v1/operators/BUS1/records?limit=4"
    seen, after = [], 0
    while True:
        page = wallet.ok("GET", f"{base}&after_id={after}", company.staff_token)
        seen += [r["id"] for r in page["records"]]
        if page["next_after_id"] is None:
            break
        after = page["next_after_id"]
    assert len(seen) == 9 == len(set(seen)) and seen == sorted(seen)
    one_card = wallet.ok(
        "GET", "/api/v1/operators/BUS1/records?card=00000000000000000002", company.staff_token
    )["records"]
    assert [r["ctc"] for r in one_card] == [0, 1, 2]
    device = wallet.ok(
        "GET", "/api/v1/operators/BUS1/records?device=000012000002", company.staff_token
    )["records"]
    assert len(device) == 3


def test_the_csv_download_streams_every_selected_record(wallet: Wallet, tmp_path) -> None:
    company = busy_day(wallet, tmp_path)
    response = wallet.client().get(
        "/api/v1/operators/BUS1/records.csv?from=2026-11-25&to=2026-11-25",
        headers={"Authorization": f"Bearer {company.staff_token}"},
    )
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.is_streamed
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 9 and {r["card_serial"] for r in rows} == {f"{i:020X}" for i in range(1, 4)}
    too_long = wallet.client().get(
        "/api/v1/operators/BUS1/records.csv?from=2025-01-01&to=2026-11-25",
        headers={"Authorization": f"Bearer {company.staff_token}"},
    )  # (refused before the answer begins: not a 200 with an empty file)
    assert too_long.status_code == 422 and "366 days" in too_long.get_json()["error"]["message"]
    other = wallet.token("staff", operator_code="BUS1")
    assert (
        wallet.client()
        .get("/api/v1/operators/NOPE/records.csv", headers={"Authorization": f"Bearer {other}"})
        .status_code
        == 404
    )


def test_devices_silent_for_hours_are_flagged(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    beat = {"firmware": "1", "blacklist_version": 0, "records_pending": 0, "psam_seq": 1}
    wallet.ok("POST", "/api/v1/pos/heartbeat", company.pos_token, beat)
    path = "/api/v1/operators/BUS1/pos-devices?silent_hours=6"
    assert wallet.ok("GET", path, company.staff_token)["devices"][0]["silent"] is False
    wallet.clock.now += timedelta(hours=7)
    device = wallet.ok("GET", path, company.staff_token)["devices"][0]
    assert device["silent"] is True and device["online"] is False
