"""POS.json: a bus POS described in a file, for ``app.py pos tap`` and testers' scripts.

    {"operator": "OP1", "route": "12", "vehicle": "V001", "fare_fen": 200,
     "terminal_id": "112233445566",          # 12 hex digits, the PSAM's terminal id
     "record_store": "pos-records.sqlite",   # relative to POS.json; survives restarts
     "repeat_tap_window_s": 10,              # optional
     "blacklist": ["00000000000000000042"],  # optional, application serial numbers
     "keys": {"purchase": {"1": HEX32}, "maintenance": HEX32, "driver_card": HEX32}}
                                             # optional: the documented demo keys

Every field is checked; a bad file is refused with a message naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from reader_sim.pos import BusPos, PosConfig
from reader_sim.psam import Psam, PsamKeys
from reader_sim.records import RecordStore
from sim_applet.personalize import DEMO_DRIVER_MASTER_KEY, DEMO_ISSUER_KEYS

_FIELDS = {
    "operator",
    "route",
    "vehicle",
    "fare_fen",
    "terminal_id",
    "record_store",
    "repeat_tap_window_s",
    "blacklist",
    "keys",
}


class PosFileError(ValueError):
    pass


def demo_psam_keys() -> PsamKeys:
    return PsamKeys(
        {1: DEMO_ISSUER_KEYS.purchase}, DEMO_ISSUER_KEYS.maintenance, DEMO_DRIVER_MASTER_KEY
    )


def open_pos(
    path: str | os.PathLike[str],
    *,
    clock: Callable[[], datetime] = datetime.now,
    random_source: Callable[[int], bytes] = os.urandom,
) -> BusPos:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PosFileError(f"cannot read POS file {path}: {error}") from None
    if not isinstance(document, dict):
        raise PosFileError(f"{path}: expected a JSON object")
    unknown = set(document) - _FIELDS
    if unknown:
        raise PosFileError(f"{path}: unknown fields {sorted(unknown)}")
    try:
        config = PosConfig(
            operator=_text(document, "operator"),
            route=_text(document, "route"),
            vehicle=_text(document, "vehicle"),
            fare_fen=_integer(document, "fare_fen"),
            repeat_tap_window_s=_integer(document, "repeat_tap_window_s", 10),
            blacklist={_hex(s, "blacklist[]", 10) for s in document.get("blacklist", [])},
        )
    except ValueError as error:
        raise PosFileError(f"{path}: {error}") from None
    terminal_id = _hex(document.get("terminal_id"), "terminal_id", 6)
    store_path = path.parent / _text(document, "record_store")
    psam = Psam(_keys(document.get("keys")), terminal_id)
    store = RecordStore(store_path)
    return BusPos(config, psam, store, clock=clock, random_source=random_source)


def _keys(keys: Any) -> PsamKeys:
    if keys is None:
        return demo_psam_keys()
    if not isinstance(keys, dict) or not isinstance(keys.get("purchase"), dict):
        raise PosFileError("keys: expected {'purchase': {version: hex}, ...}")
    purchase = {}
    for version, key in keys["purchase"].items():
        if not str(version).isdigit() or not 0 <= int(version) <= 255:
            raise PosFileError(f"keys.purchase: key version {version!r} is not 0..255")
        purchase[int(version)] = _hex(key, f"keys.purchase.{version}", 16)
    optional = {
        name: _hex(keys[name], f"keys.{name}", 16) if name in keys else None
        for name in ("maintenance", "driver_card")
    }
    return PsamKeys(purchase, optional["maintenance"], optional["driver_card"])


def _text(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise PosFileError(f"{name}: expected a non-empty string")
    return value


def _integer(document: dict[str, Any], name: str, default: int | None = None) -> int:
    value = document.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PosFileError(f"{name}: expected an integer")
    return value


def _hex(value: Any, name: str, length: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise PosFileError(f"{name}: expected {2 * length} hex digits") from None
    if len(raw) != length:
        raise PosFileError(f"{name}: expected {2 * length} hex digits")
    return raw
