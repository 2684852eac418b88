"""Issuer keys from a key file or the environment; errors name the source, never a value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim_applet.personalize import DEMO_ISSUER_KEYS
from wallet_service.keystore import key_store_from

NAMES = ("load", "purchase", "tac", "maintenance", "pin_unblock")
SECRET = "0123456789ABCDEF0123456789ABCDEE"


def test_keys_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({**{n: SECRET for n in NAMES}, "driver_card": SECRET}))
    store = key_store_from(str(path), environ={})
    assert store.issuer_keys().tac == bytes.fromhex(SECRET)
    assert store.driver_card_master() == bytes.fromhex(SECRET)
    assert SECRET.lower() not in repr(store).lower() + repr(store.issuer_keys()).lower()


def test_ota_masters_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    from otar.keys import DEMO_OTA_MASTER_KIC

    other = "FEDCBA9876543210FEDCBA9876543210"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({**{n: SECRET for n in NAMES}, "ota_kic": SECRET, "ota_kid": other}))
    assert key_store_from(str(path), environ={}).ota_masters() == (
        bytes.fromhex(SECRET),
        bytes.fromhex(other),
    )
    environ = {f"WALLET_KEY_{n.upper()}": SECRET for n in NAMES}
    assert key_store_from(None, environ).ota_masters()[0] == DEMO_OTA_MASTER_KIC
    environ |= {"WALLET_KEY_OTA_KIC": other, "WALLET_KEY_OTA_KID": SECRET}
    assert key_store_from(None, environ).ota_masters() == (
        bytes.fromhex(other),
        bytes.fromhex(SECRET),
    )


def test_keys_come_from_the_environment() -> None:
    environ = {f"WALLET_KEY_{n.upper()}": SECRET for n in NAMES}
    assert key_store_from(None, environ).issuer_keys().load == bytes.fromhex(SECRET)


def test_without_a_source_the_demo_keys_are_used() -> None:
    assert key_store_from(None, {}).issuer_keys() == DEMO_ISSUER_KEYS


@pytest.mark.parametrize(
    "document",
    [
        {n: SECRET for n in NAMES[:-1]},  # one missing
        {**{n: SECRET for n in NAMES}, "load": SECRET[:-2]},  # short
        {**{n: SECRET for n in NAMES}, "load": "zz" + SECRET[2:]},  # not hex
        {**{n: SECRET for n in NAMES}, "ota_kic": SECRET},  # an OTA master without its pair
        {**{n: SECRET for n in NAMES}, "ota_kic": SECRET, "ota_kid": SECRET[:-2]},
    ],
)
def test_a_bad_key_file_is_refused_without_echoing_keys(tmp_path: Path, document: dict) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError) as refused:
        key_store_from(str(path), environ={})
    assert SECRET[:16].lower() not in str(refused.value).lower()


def test_an_unreadable_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read key file"):
        key_store_from(str(tmp_path / "missing.json"), environ={})
