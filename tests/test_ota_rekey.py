"""OTA rekeying: the platform replaces a SIM's keyset with the next key version by PUT KEY
over secured SMS; afterwards packets under the old version are refused. Lost packets and
lost PoRs end with both sides on the same version."""

from __future__ import annotations

from pathlib import Path

import pytest

from otar.keys import (
    DEMO_OTA_MASTER_KID,
    NewKeys,
    demo_keyset,
    derive_kek,
    open_put_key,
    put_key_command,
)
from otar.packets import PorStatus, Spi, decode_por, encode_command
from otar.remote_apdu import CompactResponse
from otar.sim_side import ISD_TAR, TRANSIT_TAR
from sim_applet.personalize import personalize
from tests.helpers import purse
from tests.test_phone import PhoneWorld
from tests.wallet_fixtures import Wallet
from wallet_service.ota_channel import UNSECURED
from wallet_service.services import rekeys
from wallet_service.worker import run_once

ICCID = "8986001234567890123"
DEMO_MASTERS = (bytes.fromhex("4F544D4B4943303030303030303030AA"), DEMO_OTA_MASTER_KID)


def _new_keys(version: int) -> NewKeys:
    keyset = demo_keyset(ICCID, version)
    return NewKeys(version, keyset.kic, keyset.kid, derive_kek(DEMO_OTA_MASTER_KID, ICCID, version))


# --- the SIM's side ----------------------------------------------------------------------------


def _sim():  # type: ignore[no-untyped-def]
    return personalize(bytes.fromhex("20260000000000009001"), iccid=ICCID, ota_masters=DEMO_MASTERS)


def test_put_key_replaces_the_keyset_and_the_old_version_is_refused() -> None:
    sim = _sim()
    old = demo_keyset(ICCID, 1)
    command = put_key_command(derive_kek(DEMO_OTA_MASTER_KID, ICCID, 1), 1, _new_keys(2))
    por = sim.ota.process(encode_command(old, Spi(), ISD_TAR, 7, command), lambda t, a: [])
    answer = CompactResponse.decode(decode_por(old, Spi(), por).data)
    assert answer.last_sw == 0x9000 and answer.last_data[0] == 2
    assert set(sim.ota.keysets) == {2} and sim.ota.last_counters == {2: 7}
    ran: list[bytes] = []
    refused = sim.ota.process(
        encode_command(old, Spi(), TRANSIT_TAR, 8, bytes.fromhex("805C000204")),
        lambda tar, apdus: ran.extend(apdus) or [b"\x90\x00"],
    )
    assert decode_por(old, UNSECURED, refused).status is PorStatus.UNDEFINED_SECURITY_ERROR
    assert ran == []
    new = demo_keyset(ICCID, 2)
    info = sim.ota.process(
        encode_command(new, Spi(), ISD_TAR, 8, bytes.fromhex("80CA00E000")), lambda t, a: []
    )
    assert CompactResponse.decode(decode_por(new, Spi(), info).data).last_data[:2] == b"\xe0\x12"


@pytest.mark.parametrize(
    "damage",
    ["kcv", "version_zero", "wrong_p1", "same_version", "truncated"],
)
def test_a_bad_put_key_changes_nothing(damage: str) -> None:
    sim = _sim()
    old = demo_keyset(ICCID, 1)
    kek = derive_kek(DEMO_OTA_MASTER_KID, ICCID, 1)
    command = bytearray(put_key_command(kek, 1, _new_keys(2)))
    if damage == "kcv":
        command[-2] ^= 0x01
    elif damage == "version_zero":
        command[5] = 0
    elif damage == "wrong_p1":
        command[2] = 3
    elif damage == "same_version":
        command = bytearray(put_key_command(kek, 1, _new_keys(1)))
    else:
        command = command[:40]
        command[4] = 35
    por = sim.ota.process(encode_command(old, Spi(), ISD_TAR, 7, bytes(command)), lambda t, a: [])
    answer = CompactResponse.decode(decode_por(old, Spi(), por).data)
    assert answer.last_sw != 0x9000 and set(sim.ota.keysets) == {1}
    if damage in ("kcv", "version_zero"):  # the key blocks themselves are refused
        with pytest.raises(ValueError):
            open_put_key(kek, bytes(command[5:-1]))


# --- the platform drives it ------------------------------------------------------------------


def _rekey(world: PhoneWorld) -> dict:
    return world.wallet.ok("POST", f"/api/v1/cards/{world.serial}/ota-rekey")


def _state(world: PhoneWorld) -> dict:
    return world.wallet.ok("GET", f"/api/v1/cards/{world.serial}/ota-rekey")


def _round(world: PhoneWorld) -> None:
    run_once(world.wallet.app, world.gateway, world.bank)
    world.phone.receive()
    run_once(world.wallet.app, world.gateway, world.bank)


def test_the_platform_rekeys_a_sim_and_top_ups_go_on_under_the_new_keys(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = PhoneWorld(wallet, tmp_path)
    started = _rekey(world)
    assert (started["from_version"], started["to_version"], started["state"]) == (1, 2, "waiting")
    assert wallet.call("POST", f"/api/v1/cards/{world.serial}/ota-rekey")[0] == 409
    _round(world)
    assert _state(world)["state"] == "done" and set(world.sim.ota.keysets) == {2}
    world.screen.answers[:] = ["20", "123456"]
    world.phone.select(4)
    world.settle()
    assert purse(world.sim).balance == 2000  # packets under version 2 load the card
    world.bank.close()


def test_an_order_requested_before_a_rekey_and_paid_after_it_loads_under_the_new_keys(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The rekey's packets counted above the order's id × 1000 range: with counters from
    the order id the SIM refused the order's packets as replays; they count on from the
    card's last now."""
    from tests.test_phone import BANK_CARD

    world = PhoneWorld(wallet, tmp_path)
    world.phone.pay = None
    world.screen.answers[:] = ["20", "123456"]
    world.phone.select(4)
    run_once(world.wallet.app, world.gateway, world.bank)  # the order; not paid yet
    world.phone.receive()
    _rekey(world)
    _round(world)
    assert _state(world)["state"] == "done"
    world.bank_app(*world.phone.payment_links[0])
    world.settle()
    orders = world.wallet.ok("GET", f"/api/v1/cards/{world.serial}/topups")["orders"]
    assert [o["state"] for o in orders] == ["loaded"]
    assert world.bank.card_balance(BANK_CARD) == 100_000 - 2000
    assert purse(world.sim).balance == 2000 and set(world.sim.ota.keysets) == {2}
    world.bank.close()


def test_a_lost_proof_of_receipt_is_settled_by_a_probe_under_the_new_keys(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = PhoneWorld(wallet, tmp_path)
    _rekey(world)
    run_once(world.wallet.app, world.gateway, world.bank)  # PUT KEY out
    world.phone.receive()  # the SIM switches ...
    world.smsc.collect(world.gateway.short_code)  # ... and its PoR is lost
    world.later(rekeys.por_timeout_s)
    _round(world)  # probe under version 2 → answered
    assert _state(world)["state"] == "done"
    assert set(world.sim.ota.keysets) == {2}
    world.bank.close()


def test_a_lost_put_key_is_sent_again_after_the_probe_is_refused(
    wallet: Wallet, tmp_path: Path
) -> None:
    world = PhoneWorld(wallet, tmp_path)
    _rekey(world)
    run_once(world.wallet.app, world.gateway, world.bank)
    world.smsc.collect(world.phone.number)  # the PUT KEY never reaches the phone
    world.later(rekeys.por_timeout_s)
    _round(world)  # probe under version 2 → the SIM does not know it → PUT KEY again
    world.phone.receive()
    run_once(world.wallet.app, world.gateway, world.bank)
    state = _state(world)
    assert state["state"] == "done" and state["attempts"] == 3
    assert set(world.sim.ota.keysets) == {2}
    world.bank.close()


def test_a_rekey_waits_for_a_top_up_in_flight(wallet: Wallet, tmp_path: Path) -> None:
    world = PhoneWorld(wallet, tmp_path)
    reference = world.order(1000)
    world.pay(reference, 1000)
    run_once(world.wallet.app, world.gateway, world.bank)  # packet 1 out
    _rekey(world)
    run_once(world.wallet.app, world.gateway, world.bank)
    assert _state(world)["state"] == "waiting"
    world.settle()
    assert world.state(reference) == "loaded" and purse(world.sim).balance == 1000
    world.later(rekeys.por_timeout_s)
    _round(world)
    assert _state(world)["state"] == "done"
    world.bank.close()


def test_rekey_requests_that_make_no_sense_are_refused(wallet: Wallet, tmp_path: Path) -> None:
    world = PhoneWorld(wallet, tmp_path)
    assert wallet.call("GET", f"/api/v1/cards/{world.serial}/ota-rekey")[0] == 404
    assert wallet.call("POST", "/api/v1/cards/FFFFFFFFFFFFFFFFFFFF/ota-rekey")[0] == 404
    world.bank.close()
