"""Where the issuer's master keys come from: a key file or the environment.

A small interface (``KeyStore.issuer_keys()``) so an HSM-backed store can replace it. Keys
never reach a log, an API answer or an error message: ``IssuerKeys`` hides them in its
repr, and the errors here name the source, never the value.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

from sim_applet.personalize import DEMO_DRIVER_MASTER_KEY, DEMO_ISSUER_KEYS, IssuerKeys

ENV_PREFIX = "WALLET_KEY_"  # WALLET_KEY_LOAD, WALLET_KEY_PURCHASE, ...


class KeyStore(Protocol):
    def issuer_keys(self) -> IssuerKeys: ...

    def driver_card_master(self) -> bytes: ...


class StaticKeyStore:
    def __init__(self, issuer: IssuerKeys, driver_card_master: bytes) -> None:
        self._issuer = issuer
        self._driver = driver_card_master

    def issuer_keys(self) -> IssuerKeys:
        return self._issuer

    def driver_card_master(self) -> bytes:
        return self._driver

    def ota_masters(self) -> tuple[bytes, bytes]:
        """(master KIc, master KID) for per-SIM OTA keysets (otar.keys)."""
        from otar.keys import DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID

        return DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID

    def __repr__(self) -> str:
        return "StaticKeyStore(<hidden>)"


def demo_key_store() -> StaticKeyStore:
    return StaticKeyStore(DEMO_ISSUER_KEYS, DEMO_DRIVER_MASTER_KEY)


def key_store_from(file: str | None, environ: dict[str, str] | None = None) -> StaticKeyStore:
    """A key file (JSON, the issuer key names plus "driver_card"), else WALLET_KEY_*
    variables, else the documented demo keys."""
    environ = dict(os.environ if environ is None else environ)
    if file:
        try:
            with open(file) as handle:
                document = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read key file {file}: {type(error).__name__}") from None
        if not isinstance(document, dict):
            raise ValueError(f"key file {file}: expected a JSON object")
        driver = document.pop("driver_card", None)
        return StaticKeyStore(IssuerKeys.from_json(document), _key(driver, "driver_card"))
    names = ("load", "purchase", "tac", "maintenance", "pin_unblock")
    if any(ENV_PREFIX + name.upper() in environ for name in names):
        document = {name: environ.get(ENV_PREFIX + name.upper(), "") for name in names}
        driver = environ.get(ENV_PREFIX + "DRIVER_CARD")
        return StaticKeyStore(IssuerKeys.from_json(document), _key(driver, "driver_card"))
    return demo_key_store()


def _key(value: object, name: str) -> bytes:
    if value is None:
        return DEMO_DRIVER_MASTER_KEY
    try:
        raw = bytes.fromhex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"key {name!r} must be 32 hex digits")
    return raw
