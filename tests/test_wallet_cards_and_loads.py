"""Card lifecycle and counter top-ups through the wallet service's API, with the real card
model on the counter terminal's reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from reader_sim.counter_terminal import CounterInterrupted, CounterLoaded, CounterTerminal
from reader_sim.link import InMemoryLink
from reader_sim.platform_client import PlatformClient, PlatformRefused
from sim_applet.sim import Sim
from tests.helpers import purse
from tests.wallet_fixtures import FlaskTransport, Wallet, set_up_bus_company

COUNTER_TERMINAL = bytes.fromhex("0000000000C1")
ID_NUMBER = "110101199001011234"


def issue_card(
    wallet: Wallet, token: str, iccid: str = "8986001234567890123", phone: str = "13800138000"
) -> tuple[dict, Sim]:
    """A card issued and activated through the API, and its SIM."""
    card = wallet.ok("POST", "/api/v1/cards", token, {"iccid": iccid, "phone": phone}, status=201)
    wallet.ok("POST", f"/api/v1/cards/{card['serial']}/activate", token)
    sim = Sim.load(Path(wallet.app.config["PERSONALIZATION_DIR"]) / card["image_file"])
    return card, sim


def ledger(wallet: Wallet) -> dict[str, tuple[int, int]]:
    answer = wallet.ok("GET", "/api/v1/ledger")
    assert answer["balanced"]
    return {a["code"]: (a["debits_fen"], a["credits_fen"]) for a in answer["accounts"]}


def test_a_counter_top_up_loads_the_card_and_posts_cash_to_card_float(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    card, sim = issue_card(wallet, company.counter_token)
    terminal = CounterTerminal(
        PlatformClient(FlaskTransport(wallet), company.counter_token), COUNTER_TERMINAL
    )

    result = terminal.load(InMemoryLink(sim), 5000)

    assert isinstance(result, CounterLoaded) and result.balance_after_fen == 5000
    assert purse(sim).balance == 5000
    books = ledger(wallet)
    assert books["hall_cash:HALL-BUS1"] == (5000, 0)
    assert books[f"card_float:{card['serial']}"] == (0, 5000)
    shown = wallet.ok("GET", f"/api/v1/cards/{card['serial']}", company.counter_token)
    assert shown["balance_fen"] == 5000


@pytest.mark.parametrize("cut_after", range(1, 8))
def test_a_torn_counter_load_is_posted_once_or_not_at_all(wallet: Wallet, cut_after: int) -> None:
    company = set_up_bus_company(wallet)
    card, sim = issue_card(wallet, company.counter_token)
    terminal = CounterTerminal(
        PlatformClient(FlaskTransport(wallet), company.counter_token), COUNTER_TERMINAL
    )
    link = InMemoryLink(sim)
    sim.cut_power_after(cut_after, during_ins=0x52)

    interrupted = terminal.load(link, 3000)
    assert isinstance(interrupted, CounterInterrupted)
    link.present_card()
    terminal.recover(link, interrupted)
    terminal.recover(link, interrupted)  # a retried report changes nothing

    credited = ledger(wallet).get(f"card_float:{card['serial']}", (0, 0))[1]
    assert credited == purse(sim).balance in (0, 3000)


def test_a_card_with_another_issuers_keys_is_refused_and_nothing_is_posted(
    wallet: Wallet,
) -> None:
    from sim_applet.personalize import IssuerKeys, personalize

    company = set_up_bus_company(wallet)
    card, _ = issue_card(wallet, company.counter_token)
    clone = personalize(
        bytes.fromhex(card["serial"]),
        issuer=IssuerKeys(*(bytes([i]) * 16 for i in range(1, 6))),
    )
    terminal = CounterTerminal(
        PlatformClient(FlaskTransport(wallet), company.counter_token), COUNTER_TERMINAL
    )
    with pytest.raises(PlatformRefused) as refused:
        terminal.load(InMemoryLink(clone), 5000)
    assert refused.value.code == "card_refused"
    assert purse(clone).balance == 0
    assert f"card_float:{card['serial']}" not in {k for k, v in ledger(wallet).items() if v[1]}


def test_the_daily_limit_of_a_hall_stops_loads(wallet: Wallet) -> None:
    wallet.ok(
        "POST",
        "/api/v1/halls",
        body={"code": "AGENT1", "name": "Agent", "kind": "agent", "daily_limit_fen": 6000},
    )
    token = wallet.token("counter", hall_code="AGENT1")
    _, sim = issue_card(wallet, token)
    terminal = CounterTerminal(PlatformClient(FlaskTransport(wallet), token), COUNTER_TERMINAL)
    assert isinstance(terminal.load(InMemoryLink(sim), 5000), CounterLoaded)
    with pytest.raises(PlatformRefused) as refused:
        terminal.load(InMemoryLink(sim), 2000)
    assert refused.value.code == "limit_exceeded"
    assert purse(sim).balance == 5000


def test_loss_report_hot_lists_reissue_moves_the_balance_close_refunds(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    token = company.counter_token
    card, sim = issue_card(wallet, token)
    CounterTerminal(PlatformClient(FlaskTransport(wallet), token), COUNTER_TERMINAL).load(
        InMemoryLink(sim), 4000
    )
    serial = card["serial"]
    code, _ = wallet.call("POST", f"/api/v1/cards/{serial}/loss", token, {"id_number": ID_NUMBER})
    assert code == 409  # anonymous cards cannot be reported lost
    wallet.ok(
        "PUT",
        f"/api/v1/cards/{serial}/holder",
        token,
        {"name": "Li Lei", "id_type": "resident_id", "id_number": ID_NUMBER},
    )
    shown = wallet.ok("GET", f"/api/v1/cards/{serial}", token)
    assert shown["holder_id_masked"] == "110***********1234"
    code, _ = wallet.call("POST", f"/api/v1/cards/{serial}/loss", token, {"id_number": "999999999"})
    assert code == 422
    wallet.ok("POST", f"/api/v1/cards/{serial}/loss", token, {"id_number": ID_NUMBER})
    blacklist = wallet.ok("GET", "/api/v1/pos/blacklist?since=0", company.pos_token)
    assert blacklist["add"] == [serial] and blacklist["full"]

    body = {"id_number": ID_NUMBER, "iccid": "8986009999999999999", "phone": "13900139000"}
    new = wallet.ok("POST", f"/api/v1/cards/{serial}/reissue", token, body, key="re-1", status=201)
    again = wallet.ok("POST", f"/api/v1/cards/{serial}/reissue", token, body, key="re-1")
    assert again == new and new["balance_fen"] == 4000
    new_sim = Sim.load(Path(wallet.app.config["PERSONALIZATION_DIR"]) / new["image_file"])
    assert purse(new_sim).balance == 4000

    closed = wallet.ok(
        "POST",
        f"/api/v1/cards/{new['serial']}/close",
        token,
        {"id_number": ID_NUMBER},
        key="close-1",
    )
    assert closed["refund_fen"] == 4000 and closed["card"]["status"] == "closed"
    books = ledger(wallet)
    assert books["hall_cash:HALL-BUS1"] == (4000, 4000)
    assert books[f"card_float:{new['serial']}"] == (4000, 4000)


def test_same_idempotency_key_same_body_replays_another_body_conflicts(wallet: Wallet) -> None:
    company = set_up_bus_company(wallet)
    token = company.counter_token
    card, _ = issue_card(wallet, token)
    serial = card["serial"]
    wallet.ok(
        "PUT",
        f"/api/v1/cards/{serial}/holder",
        token,
        {"name": "Li Lei", "id_type": "resident_id", "id_number": ID_NUMBER},
    )
    path = f"/api/v1/cards/{serial}/close"
    first = wallet.ok("POST", path, token, {"id_number": ID_NUMBER}, key="k1")
    assert wallet.ok("POST", path, token, {"id_number": ID_NUMBER}, key="k1") == first
    code, answer = wallet.call("POST", path, token, {"id_number": "OTHER123"}, key="k1")
    assert code == 409 and "Idempotency-Key" in answer["error"]["message"]
    code, answer = wallet.call("POST", path, token, {"id_number": ID_NUMBER})
    assert code == 422 and "Idempotency-Key" in answer["error"]["message"]
