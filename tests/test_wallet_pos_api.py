"""What buses send and fetch: record batches (idempotent, conflicts flagged), blacklist
versions, heartbeats — and what staff of one bus company may see."""

from __future__ import annotations

import json
from datetime import timedelta

from reader_sim.link import InMemoryLink
from reader_sim.platform_client import PlatformClient, PlatformUnavailable
from reader_sim.pos import Outcome
from reader_sim.pos_file import open_pos
from reader_sim.uploader import Uploader
from tests.helpers import Clock, new_card, new_driver_card
from tests.wallet_fixtures import BusCompany, FlaskTransport, Wallet, set_up_bus_company


def bus_with_fares(company: BusCompany, fares: int, tmp_path) -> tuple:  # type: ignore[no-untyped-def]
    """The provisioned POS (its PSAM file from the platform), a driver, ``fares`` taps."""
    config = json.loads(company.psam_file.read_text())
    config["record_store"] = str(tmp_path / "pos-records.sqlite")
    path = tmp_path / "pos.json"
    path.write_text(json.dumps(config))
    clock = Clock()
    pos = open_pos(path, clock=clock)
    pos.present(InMemoryLink(new_driver_card(driver_id="D007", operator="BUS1")))
    for i in range(fares):
        clock.advance(minutes=1)
        assert pos.present(InMemoryLink(new_card(i + 1, balance_fen=1000))).outcome is Outcome.PAID
    return pos, clock


def test_uploads_are_stored_once_and_acknowledged_on_the_pos(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    pos, _ = bus_with_fares(company, 5, tmp_path)
    client = PlatformClient(FlaskTransport(wallet), company.pos_token)
    uploader = Uploader(pos.store, client, pos.terminal_id, batch_records=2)

    report = uploader.upload_all()

    assert (report.uploaded, report.batches) == (5, 3)
    assert pos.store.records(only_unacknowledged=True) == []
    records = [r.to_json() for r in pos.store.records()]
    again = wallet.ok("POST", "/api/v1/pos/records", company.pos_token, {"records": records})
    assert again == {"accepted": [], "duplicate": [1, 2, 3, 4, 5], "rejected": []}
    pos.store.close()


def test_a_conflicting_record_is_flagged_never_overwritten(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    pos, _ = bus_with_fares(company, 1, tmp_path)
    record = pos.store.records()[0].to_json()
    pos.store.close()
    wallet.ok("POST", "/api/v1/pos/records", company.pos_token, {"records": [record]})
    forged = {**record, "amount": 1}
    answer = wallet.ok("POST", "/api/v1/pos/records", company.pos_token, {"records": [forged]})
    assert answer["accepted"] == [] and answer["rejected"][0]["reason"].startswith("conflicts")
    other = {**record, "terminal_id": "0000120000FF", "terminal_seq": 9}
    answer = wallet.ok("POST", "/api/v1/pos/records", company.pos_token, {"records": [other]})
    assert answer["rejected"] == [{"terminal_seq": 9, "reason": "not this device's terminal id"}]
    from sqlalchemy import select

    from wallet_service.models import RecordConflict, TapRecord

    with wallet.database.transaction() as session:
        stored = session.scalars(select(TapRecord)).all()
        assert [r.amount_fen for r in stored] == [record["amount"]]
        assert len(session.scalars(select(RecordConflict)).all()) == 2


def test_a_malformed_batch_changes_nothing(wallet: Wallet, tmp_path) -> None:
    company = set_up_bus_company(wallet)
    pos, _ = bus_with_fares(company, 2, tmp_path)
    good, bad = (r.to_json() for r in pos.store.records())
    pos.store.close()
    bad["tac"] = "not hex"
    code, answer = wallet.call(
        "POST", "/api/v1/pos/records", company.pos_token, {"records": [good, bad]}
    )
    assert code == 422 and answer["error"]["details"]["errors"][0]["loc"] == "records.1.tac"
    for body in ({"records": "x"}, [], {"records": [good], "extra": 1}, None):
        assert wallet.call("POST", "/api/v1/pos/records", company.pos_token, body)[0] == 422
    answer = wallet.ok("POST", "/api/v1/pos/records", company.pos_token, {"records": [good]})
    assert answer["accepted"] == [good["terminal_seq"]]


def test_the_uploader_keeps_records_while_the_platform_is_down(tmp_path, wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    pos, _ = bus_with_fares(company, 3, tmp_path)

    class Down:
        def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise PlatformUnavailable("no GPRS")

    slept: list[float] = []
    report = Uploader(
        pos.store, PlatformClient(Down(), "t"), pos.terminal_id, sleep=slept.append
    ).upload_all()
    assert report.uploaded == 0 and len(pos.store.records(only_unacknowledged=True)) == 3
    assert slept == sorted(slept) and slept[0] == 0.5 and len(slept) == 7
    pos.store.close()


def test_blacklist_versions_give_full_lists_and_deltas(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    from wallet_service.services.cards import blacklist
    from wallet_service.services.registry import Context

    def change(serial: str, action: str) -> None:
        def work(session):  # type: ignore[no-untyped-def]
            ctx = Context(session, None, wallet.clock(), None, None)  # type: ignore[arg-type]
            blacklist(ctx, serial, action, "test")

        wallet.database.run(work)

    change("A" * 20, "add")
    change("B" * 20, "add")
    full = wallet.ok("GET", "/api/v1/pos/blacklist", company.pos_token)
    assert full == {"version": 2, "full": True, "add": ["A" * 20, "B" * 20], "remove": []}
    change("A" * 20, "remove")
    delta = wallet.ok("GET", "/api/v1/pos/blacklist?since=2", company.pos_token)
    assert delta == {"version": 3, "full": False, "add": [], "remove": ["A" * 20]}
    assert wallet.call("GET", "/api/v1/pos/blacklist?since=-1", company.pos_token)[0] == 422


def test_heartbeats_feed_the_device_status_view(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    beat = {"firmware": "1.2.0", "blacklist_version": 0, "records_pending": 4, "psam_seq": 17}
    wallet.ok("POST", "/api/v1/pos/heartbeat", company.pos_token, beat)
    status = wallet.ok("GET", "/api/v1/operators/BUS1/pos-devices", company.staff_token)
    device = status["devices"][0]
    assert (device["online"], device["records_pending"], device["psam_seq"]) == (True, 4, 17)
    wallet.clock.now += timedelta(hours=1)
    status = wallet.ok("GET", "/api/v1/operators/BUS1/pos-devices", company.staff_token)
    assert status["devices"][0]["online"] is False


def test_a_retired_pos_is_out_of_service_for_good(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    beat = {"firmware": "1.2.0", "blacklist_version": 0, "records_pending": 3, "psam_seq": 9}
    wallet.ok("POST", "/api/v1/pos/heartbeat", company.pos_token, beat)
    retire = "/api/v1/operators/BUS1/pos-devices/000012000001/retire"
    why = {"reason": " bus scrapped "}
    assert wallet.call("POST", retire, company.counter_token, why)[0] == 403
    assert wallet.call("POST", retire, company.staff_token, {"reason": "  "})[0] == 422
    missing = "/api/v1/operators/BUS1/pos-devices/000012009999/retire"
    assert wallet.call("POST", missing, company.staff_token, why)[0] == 404
    retired = wallet.ok("POST", retire, company.staff_token, why)
    assert (retired["tokens_revoked"], retired["records_pending"]) == (1, 3)
    assert wallet.call("POST", retire, company.staff_token, why)[0] == 409  # once
    assert wallet.call("POST", "/api/v1/pos/heartbeat", company.pos_token, beat)[0] == 401
    new_token = wallet.token("pos", terminal_id="000012000001")
    code, answer = wallet.call("POST", "/api/v1/pos/heartbeat", new_token, beat)
    assert code == 403 and "retired" in answer["error"]["message"]
    [device] = wallet.ok("GET", "/api/v1/operators/BUS1/pos-devices", company.staff_token)[
        "devices"
    ]
    assert device["retired_at"] == retired["retired_at"]
    assert (device["online"], device["silent"], device["records_pending"]) == (False, False, 3)
    [audited] = wallet.audited("pos.retire")
    assert (audited["reason"], audited["records_pending"]) == ("bus scrapped", 3)


def test_one_bus_companys_staff_cannot_see_or_touch_anothers(wallet: Wallet) -> None:
    first = set_up_bus_company(wallet, "BUS1", "000012000001")
    set_up_bus_company(wallet, "BUS2", "000022000001")
    for method, path, body in [
        ("GET", "/api/v1/operators/BUS2/vehicles", None),
        ("GET", "/api/v1/operators/BUS2/pos-devices", None),
        ("POST", "/api/v1/operators/BUS2/routes", {"code": "9", "name": "x", "fare_fen": 1}),
        ("POST", "/api/v1/operators/BUS2/pos-devices/000022000001/retire", {"reason": "x"}),
    ]:
        code, answer = wallet.call(method, path, first.staff_token, body)
        assert code == 404, (path, answer)
    assert wallet.call("GET", "/api/v1/operators/BUS1/vehicles", first.staff_token)[0] == 200
    # roles: a POS cannot create things, a counter cannot read the registry
    assert (
        wallet.call("POST", "/api/v1/operators", first.pos_token, {"code": "X", "name": "x"})[0]
        == 403
    )
    assert wallet.call("GET", "/api/v1/operators/BUS1/vehicles", first.counter_token)[0] == 403
    assert wallet.call("GET", "/api/v1/ledger", "not-a-token")[0] == 401


def test_a_card_reported_lost_is_blocked_at_its_next_tap_after_the_bus_syncs(
    wallet: Wallet, tmp_path
) -> None:
    from reader_sim.gprs import GprsSync
    from reader_sim.pos import Refusal
    from sim_applet.sim import Sim
    from tests.helpers import purse

    company = set_up_bus_company(wallet)
    counter = company.counter_token
    card = wallet.ok(
        "POST", "/api/v1/cards", counter, {"iccid": "8986001234567890123", "phone": "13800138000"}
    )
    serial = card["serial"]
    wallet.ok("POST", f"/api/v1/cards/{serial}/activate", counter)
    wallet.ok(
        "PUT",
        f"/api/v1/cards/{serial}/holder",
        counter,
        {"name": "Li Lei", "id_type": "resident_id", "id_number": "110101199001011234"},
    )
    phone = Sim.load(wallet.app.config["PERSONALIZATION_DIR"] + "/" + card["image_file"])
    pos, clock = bus_with_fares(company, 2, tmp_path)
    sync = GprsSync(pos, PlatformClient(FlaskTransport(wallet), company.pos_token))
    assert sync.sync().errors == []

    wallet.ok("POST", f"/api/v1/cards/{serial}/loss", counter, {"id_number": "110101199001011234"})
    report = sync.sync()
    clock.advance(minutes=5)
    outcome = pos.present(InMemoryLink(phone))

    assert report.blacklist_version == 1 and report.errors == []
    assert outcome.refusal is Refusal.BLACKLISTED and purse(phone).blocked
    status = wallet.ok("GET", "/api/v1/operators/BUS1/pos-devices", company.staff_token)
    device = status["devices"][0]
    assert (device["blacklist_version"], device["blacklist_lag"], device["records_pending"]) == (
        1,
        0,
        0,
    )
    assert device["psam_seq"] == pos.psam.terminal_seq
    pos.store.close()
