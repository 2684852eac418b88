"""A SIM is a file: a versioned JSON card image that saves and loads exactly.

Layout (project-defined), version 1::

    {"format": "rfid-sim-image", "version": 1,
     "sim": {"iccid": "...", "atr": HEX, "applications": [APPLICATION, ...]},
     "sha256": HEX of the canonical JSON of "sim"}

Keys and byte fields are hex here because this is an edge (a file people open). A file
that is not JSON, not ours, of another version, or whose checksum does not match is
refused with ``ImageError`` naming what is wrong; nothing half-loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sim_applet.crypto import Algorithm
from sim_applet.driver_card import DriverCard, DriverCardState
from sim_applet.purse import (
    Proof,
    PurseKeys,
    PurseState,
    TransitPurse,
    capp_record_bytes_max,
    capp_records_max,
)
from sim_applet.sim import RandomSource, Sim
from sim_applet.structures import PublicData

IMAGE_FORMAT = "rfid-sim-image"
IMAGE_VERSION = 1
image_bytes_max = 1_000_000


class ImageError(ValueError):
    """The file is not a card image this version can load."""


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sim_to_dict(sim: Sim) -> dict[str, Any]:
    body = {
        "iccid": sim.iccid,
        "atr": sim.atr.hex(),
        "applications": [_application_to_dict(app) for app in sim.applications],
    }
    if sim.ota is not None:  # optional: images without OTA keys stay valid
        body["ota"] = sim.ota.to_dict()
    if sim.toolkit_settings is not None:  # optional too: a SIM without a menu
        body["toolkit"] = sim.toolkit_settings.to_dict()
    return body


def sim_from_dict(body: dict[str, Any], random_source: RandomSource) -> Sim:
    reader = _Reader(body, "sim")
    applications = [
        _application_from_dict(_Reader(item, f"sim.applications[{i}]"))
        for i, item in enumerate(reader.list("applications"))
    ]
    sim = Sim(
        reader.text("iccid"),
        applications,
        random_source=random_source,
        atr=reader.hex("atr"),
    )
    if "ota" in body:
        from otar.sim_side import OtaSecurityDomain

        try:
            sim.ota = OtaSecurityDomain.from_dict(body["ota"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ImageError(f"sim.ota: {error}") from None
    if "toolkit" in body:
        from sim_applet.toolkit import ToolkitSettings

        try:
            sim.toolkit_settings = ToolkitSettings.from_dict(body["toolkit"])
        except (KeyError, TypeError, ValueError) as error:
            raise ImageError(f"sim.toolkit: {error}") from None
    return sim


def encode_image(sim: Sim) -> bytes:
    body = sim_to_dict(sim)
    document = {
        "format": IMAGE_FORMAT,
        "version": IMAGE_VERSION,
        "sim": body,
        "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
    }
    return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"


def decode_image(raw: bytes, random_source: RandomSource) -> Sim:
    if len(raw) > image_bytes_max:
        raise ImageError(f"not a card image: larger than {image_bytes_max} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ImageError(f"not a card image: not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != IMAGE_FORMAT:
        raise ImageError(f"not a card image: format is not {IMAGE_FORMAT!r}")
    if document.get("version") != IMAGE_VERSION:
        raise ImageError(
            f"card image version {document.get('version')!r} is not supported "
            f"(this program reads version {IMAGE_VERSION})"
        )
    body = document.get("sim")
    if not isinstance(body, dict):
        raise ImageError("card image has no 'sim' object")
    if hashlib.sha256(_canonical(body)).hexdigest() != document.get("sha256"):
        raise ImageError("card image is corrupted: checksum does not match its content")
    return sim_from_dict(body, random_source)


def write_image(sim: Sim, path: Path) -> None:
    """Write atomically: a crash mid-save leaves the old image or the new one, never half."""
    raw = encode_image(sim)
    directory = path.resolve().parent
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_image(path: Path, random_source: RandomSource) -> Sim:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read card image {path}: {error.strerror}") from None
    return decode_image(raw, random_source)


# --- applications --------------------------------------------------------------------------


def _application_to_dict(app: object) -> dict[str, Any]:
    if isinstance(app, TransitPurse):
        return {"kind": app.kind, **_purse_to_dict(app.state)}
    if isinstance(app, DriverCard):
        state = app.state
        return {"kind": app.kind, "data": state.data.hex(), "auth_key": state.auth_key.hex()}
    raise TypeError(f"no image layout for {type(app).__name__}")


def _application_from_dict(reader: _Reader) -> Any:
    kind = reader.text("kind")
    if kind == TransitPurse.kind:
        return TransitPurse(_purse_from_dict(reader))
    if kind == DriverCard.kind:
        return DriverCard(DriverCardState(reader.hex("data", 64), reader.hex("auth_key", 16)))
    raise ImageError(f"{reader.where}.kind: unknown application kind {kind!r}")


def _purse_to_dict(state: PurseState) -> dict[str, Any]:
    keys = state.keys
    return {
        "keys": {
            "algorithm": keys.algorithm.label,
            "key_version": keys.key_version,
            "key_index": keys.key_index,
            **{name: getattr(keys, name).hex() for name in _KEY_NAMES},
        },
        "public_data": state.public_data.hex(),
        "holder_data": state.holder_data.hex(),
        "pin": state.pin.hex(),
        "pin_tries_max": state.pin_tries_max,
        "pin_tries_left": state.pin_tries_left,
        "balance": state.balance,
        "balance_limit": state.balance_limit,
        "overdraft_limit": state.overdraft_limit,
        "online_ctc": state.online_ctc,
        "offline_ctc": state.offline_ctc,
        "log": [record.hex() for record in state.log],
        "proofs": [
            {
                "type": p.transaction_type,
                "ctc_after": p.ctc_after,
                "mac2": p.mac2.hex(),
                "tac": p.tac.hex(),
            }
            for p in state.proofs
        ],
        "capp_records": [record.hex() for record in state.capp_records],
        "blocked": state.blocked,
    }


_KEY_NAMES = ("dlk", "dpk", "dtk", "damk", "dpuk")


def _purse_from_dict(reader: _Reader) -> PurseState:
    keys = reader.child("keys")
    try:
        algorithm = Algorithm.from_name(keys.text("algorithm"))
    except ValueError as error:
        raise ImageError(f"{keys.where}.algorithm: {error}") from None
    purse_keys = PurseKeys(
        algorithm=algorithm,
        key_version=keys.integer("key_version", 0xFF),
        key_index=keys.integer("key_index", 0xFF),
        **{name: keys.hex(name, 16) for name in _KEY_NAMES},
    )
    proofs = tuple(
        Proof(
            p.integer("type", 0xFF),
            p.integer("ctc_after", 0xFFFF),
            p.hex("mac2", 4),
            p.hex("tac", 4),
        )
        for p in (
            _Reader(item, f"{reader.where}.proofs[{i}]")
            for i, item in enumerate(reader.list("proofs"))
        )
    )
    # The card decodes these on SELECT and DEBIT: refuse here what would break it there.
    public_data = reader.hex("public_data", 30)
    try:
        PublicData.decode(public_data)
    except ValueError as error:
        raise ImageError(f"{reader.where}.public_data: {error}") from None
    capp_records = tuple(reader.hex_list("capp_records"))
    if len(capp_records) != capp_records_max or any(
        len(record) > capp_record_bytes_max for record in capp_records
    ):
        raise ImageError(
            f"{reader.where}.capp_records: expected {capp_records_max} records "
            f"of at most {capp_record_bytes_max} bytes"
        )
    return PurseState(
        keys=purse_keys,
        public_data=public_data,
        holder_data=reader.hex("holder_data"),
        pin=reader.hex("pin"),
        pin_tries_max=reader.integer("pin_tries_max", 15),
        pin_tries_left=reader.integer("pin_tries_left", 15),
        balance=reader.integer("balance", 0xFFFFFFFF),
        balance_limit=reader.integer("balance_limit", 0xFFFFFFFF),
        overdraft_limit=reader.integer("overdraft_limit", 0xFFFFFF),
        online_ctc=reader.integer("online_ctc", 0xFFFF),
        offline_ctc=reader.integer("offline_ctc", 0xFFFF),
        log=tuple(reader.hex_list("log", 23)),
        proofs=proofs,
        capp_records=capp_records,
        blocked=reader.boolean("blocked"),
    )


class _Reader:
    """Typed access to one JSON object, naming the field in every error."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ImageError(f"{where}: expected an object")
        self.value = value
        self.where = where

    def _get(self, name: str) -> Any:
        if name not in self.value:
            raise ImageError(f"{self.where}.{name}: missing")
        return self.value[name]

    def child(self, name: str) -> _Reader:
        return _Reader(self._get(name), f"{self.where}.{name}")

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise ImageError(f"{self.where}.{name}: expected a string")
        return value

    def integer(self, name: str, maximum: int) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise ImageError(f"{self.where}.{name}: expected an integer 0..{maximum}")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise ImageError(f"{self.where}.{name}: expected true or false")
        return value

    def hex(self, name: str, length: int | None = None) -> bytes:
        return _hex(self._get(name), f"{self.where}.{name}", length)

    def list(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise ImageError(f"{self.where}.{name}: expected a list")
        return value

    def hex_list(self, name: str, length: int | None = None) -> list[bytes]:
        return [
            _hex(item, f"{self.where}.{name}[{i}]", length)
            for i, item in enumerate(self.list(name))
        ]


def _hex(value: Any, where: str, length: int | None) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None:
        raise ImageError(f"{where}: expected hex digits")
    if length is not None and len(raw) != length:
        raise ImageError(f"{where}: expected {length} bytes, got {len(raw)}")
    return raw
