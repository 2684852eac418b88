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
from wallet_service.errors import ConfigurationError

ENV_PREFIX = "WALLET_KEY_"  # WALLET_KEY_LOAD, WALLET_KEY_PURCHASE, ...


class KeyStore(Protocol):
    def issuer_keys(self) -> IssuerKeys: ...

    def driver_card_master(self) -> bytes: ...


class StaticKeyStore:
    def __init__(
        self,
        issuer: IssuerKeys,
        driver_card_master: bytes,
        ota_masters: tuple[bytes, bytes] | None = None,
    ) -> None:
        from otar.keys import DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID

        self._issuer = issuer
        self._driver = driver_card_master
        self._ota = ota_masters or (DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID)

    def issuer_keys(self) -> IssuerKeys:
        return self._issuer

    def driver_card_master(self) -> bytes:
        return self._driver

    def ota_masters(self) -> tuple[bytes, bytes]:
        """(master KIc, master KID) for per-SIM OTA keysets (otar.keys)."""
        return self._ota

    def __repr__(self) -> str:
        return "StaticKeyStore(<hidden>)"


def demo_key_store() -> StaticKeyStore:
    return StaticKeyStore(DEMO_ISSUER_KEYS, DEMO_DRIVER_MASTER_KEY)


def key_store_from(file: str | None, environ: dict[str, str] | None = None) -> StaticKeyStore:
    """A key file (JSON, the issuer key names plus "driver_card", and "ota_kic" with
    "ota_kid" for the OTA masters), else WALLET_KEY_* variables (WALLET_KEY_OTA_KIC, …),
    else the documented demo keys. Absent OTA masters are the demo ones."""
    environ = dict(os.environ if environ is None else environ)
    if file:
        try:
            with open(file) as handle:
                document = json.load(handle)
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"cannot read key file {file}: {type(error).__name__}"
            ) from None
        if not isinstance(document, dict):
            raise ConfigurationError(f"key file {file}: expected a JSON object")
        driver = document.pop("driver_card", None)
        ota = _ota_masters(document.pop("ota_kic", None), document.pop("ota_kid", None))
        return StaticKeyStore(IssuerKeys.from_json(document), _key(driver, "driver_card"), ota)
    names = ("load", "purchase", "tac", "maintenance", "pin_unblock")
    if any(ENV_PREFIX + name.upper() in environ for name in names):
        document = {name: environ.get(ENV_PREFIX + name.upper(), "") for name in names}
        driver = environ.get(ENV_PREFIX + "DRIVER_CARD")
        ota = _ota_masters(environ.get(ENV_PREFIX + "OTA_KIC"), environ.get(ENV_PREFIX + "OTA_KID"))
        return StaticKeyStore(IssuerKeys.from_json(document), _key(driver, "driver_card"), ota)
    return demo_key_store()


def _key(value: object, name: str) -> bytes:
    if value is None:
        return DEMO_DRIVER_MASTER_KEY
    try:
        raw = bytes.fromhex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ConfigurationError(f"key {name!r} must be 32 hex digits")
    return raw


def _ota_masters(kic: object, kid: object) -> tuple[bytes, bytes] | None:
    if kic is None and kid is None:
        return None
    if kic is None or kid is None:
        raise ConfigurationError("OTA master keys come as a pair: ota_kic and ota_kid")
    return _key(kic, "ota_kic"), _key(kid, "ota_kid")
