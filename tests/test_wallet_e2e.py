"""End to end over real HTTP: ``python app.py serve`` as its own process (granian), tokens
from ``app.py admin create-token``, the counter terminal and the POS uploader talking to it
with requests — the way an integrator runs it."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from reader_sim.counter_terminal import CounterLoaded, CounterTerminal
from reader_sim.link import InMemoryLink
from reader_sim.platform_client import HttpTransport, PlatformClient
from reader_sim.pos import Outcome
from reader_sim.pos_file import open_pos
from reader_sim.uploader import Uploader
from sim_applet.sim import Sim
from tests.helpers import Clock, new_driver_card, purse
from tests.wallet_fixtures import cli_token


def test_a_card_is_issued_loaded_at_the_counter_ridden_and_its_fares_uploaded(
    service: tuple[str, dict], tmp_path: Path
) -> None:
    base, env = service
    transport = HttpTransport(base)
    admin = PlatformClient(transport, cli_token(env, "--role", "admin"))
    admin.call("POST", "/api/v1/operators", {"code": "BUS1", "name": "Bus Co"})
    admin.call(
        "POST",
        "/api/v1/halls",
        {"code": "H1", "name": "Hall 1", "kind": "hall", "daily_limit_fen": 100_000},
    )
    staff = PlatformClient(transport, cli_token(env, "--role", "staff", "--operator", "BUS1"))
    staff.call("POST", "/api/v1/operators/BUS1/fleets", {"code": "F1", "name": "Fleet"})
    staff.call(
        "POST", "/api/v1/operators/BUS1/routes", {"code": "12", "name": "R", "fare_fen": 200}
    )
    staff.call(
        "POST",
        "/api/v1/operators/BUS1/vehicles",
        {"code": "V1", "plate": "A-1", "fleet": "F1", "route": "12"},
    )
    device = staff.call(
        "POST",
        "/api/v1/operators/BUS1/pos-devices",
        {"terminal_id": "000012000001", "vehicle": "V1"},
    )
    counter = PlatformClient(transport, cli_token(env, "--role", "counter", "--hall", "H1"))

    card = counter.call(
        "POST", "/api/v1/cards", {"iccid": "8986001234567890123", "phone": "13800138000"}
    )
    counter.call("POST", f"/api/v1/cards/{card['serial']}/activate")
    perso = Path(env["WALLET_INSTANCE_DIR"]) / "personalization"
    sim = Sim.load(perso / card["image_file"])
    loaded = CounterTerminal(counter, bytes.fromhex("0000000000C1")).load(InMemoryLink(sim), 1000)
    assert isinstance(loaded, CounterLoaded)

    config = json.loads((perso / device["psam_file"]).read_text())
    config["record_store"] = str(tmp_path / "pos.sqlite")
    (tmp_path / "pos.json").write_text(json.dumps(config))
    clock = Clock()
    pos = open_pos(tmp_path / "pos.json", clock=clock)
    pos.present(InMemoryLink(new_driver_card(operator="BUS1")))
    for _ in range(3):
        clock.advance(minutes=20)
        assert pos.present(InMemoryLink(sim)).outcome is Outcome.PAID
    report = Uploader(
        pos.store, PlatformClient(transport, device["token"]), pos.terminal_id
    ).upload_all()
    pos.store.close()

    assert report.uploaded == 3 and purse(sim).balance == 400
    shown = counter.call("GET", f"/api/v1/cards/{card['serial']}")
    assert shown["balance_fen"] == 1000  # taps reach the card float at clearing
    assert admin.call("GET", "/api/v1/ledger")["balanced"]
    bad = requests.post(
        f"{base}/api/v1/pos/records",
        data=b"{not json",
        headers={"Authorization": f"Bearer {device['token']}"},
        timeout=5,
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
    assert requests.get(f"{base}/openapi.json", timeout=5).json()["openapi"].startswith("3.")
    transport.close()
