"""Build a card image from issuer master keys and an application serial number.

The platform (and ``app.py card new``) calls ``personalize``; the card keys are derived
here, once, and only the derived keys go into the image (card-application.md §3).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path

from sim_applet import crypto
from sim_applet.crypto import Algorithm
from sim_applet.driver_card import DriverCard, DriverCardState, DriverData
from sim_applet.purse import PurseKeys, PurseState, TransitPurse, default_balance_limit_fen
from sim_applet.sim import RandomSource, Sim
from sim_applet.structures import PublicData, bcd_encode
from sim_applet.toolkit import ToolkitSettings

DEMO_ISSUER_ID = bytes.fromhex("4355534D42555331")  # "CUSMBUS1", project demo issuer
APP_TYPE_TRANSIT = 0x02  # project-defined: application type "transit e-purse"
APP_VERSION = 0x01
DEFAULT_PIN = "123456"


@dataclass(frozen=True)
class IssuerKeys:
    """The issuer's master keys, 16 bytes each. The key file names them as here."""

    load: bytes
    purchase: bytes
    tac: bytes
    maintenance: bytes
    pin_unblock: bytes

    def __post_init__(self) -> None:
        for item in fields(self):
            if len(getattr(self, item.name)) != 16:
                raise ValueError(f"issuer key {item.name!r} must be 16 bytes (32 hex digits)")

    def __repr__(self) -> str:  # keys never reach a log
        return "IssuerKeys(<hidden>)"

    @classmethod
    def from_json(cls, document: object) -> IssuerKeys:
        names = [item.name for item in fields(cls)]
        if not isinstance(document, dict) or set(document) != set(names):
            raise ValueError(f"a key file is a JSON object with exactly: {', '.join(names)}")
        try:
            return cls(**{name: bytes.fromhex(document[name]) for name in names})
        except (TypeError, ValueError) as error:
            raise ValueError(f"key file: {error}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> IssuerKeys:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read key file {path}: {error}") from None
        return cls.from_json(document)


# Documented demo keys (README): public test keys, never for a real deployment.
DEMO_ISSUER_KEYS = IssuerKeys(
    load=bytes.fromhex("11111111111111112222222222222222"),
    purchase=bytes.fromhex("11223344556677888877665544332211"),
    tac=bytes.fromhex("33333333333333334444444444444444"),
    maintenance=bytes.fromhex("55555555555555556666666666666666"),
    pin_unblock=bytes.fromhex("77777777777777778888888888888888"),
)
DEMO_DRIVER_MASTER_KEY = bytes.fromhex("99999999999999990000000000000000")


def card_keys(
    issuer: IssuerKeys, serial: bytes, algorithm: Algorithm, key_version: int = 1
) -> PurseKeys:
    def derive(master: bytes) -> bytes:
        return crypto.diversify(algorithm, master, serial)

    return PurseKeys(
        algorithm=algorithm,
        key_version=key_version,
        key_index=1,
        dlk=derive(issuer.load),
        dpk=derive(issuer.purchase),
        dtk=derive(issuer.tac),
        damk=derive(issuer.maintenance),
        dpuk=derive(issuer.pin_unblock),
    )


def personalize(
    serial: bytes,
    *,
    issuer: IssuerKeys = DEMO_ISSUER_KEYS,
    algorithm: Algorithm = Algorithm.TDES,
    iccid: str | None = None,
    balance_fen: int = 0,
    balance_limit_fen: int = default_balance_limit_fen,
    pin: str = DEFAULT_PIN,
    start_date: date = date(2026, 1, 1),
    expiry_date: date = date(2036, 12, 31),
    holder_data: bytes = b"",
    key_version: int = 1,
    random_source: RandomSource = os.urandom,
    ota_masters: tuple[bytes, bytes] | None = None,
    menu: ToolkitSettings | None = None,
) -> Sim:
    """A new SIM carrying the transit e-purse for application serial number ``serial`` and
    its phone menu (``menu``: language and the platform's number; default Chinese, the
    demo short code); with ``ota_masters`` (KIc, KID masters) also its OTA keyset."""
    if len(serial) != 10:
        raise ValueError("the application serial number is 10 bytes (20 hex digits)")
    if not 0 <= balance_fen <= balance_limit_fen:
        raise ValueError(f"initial balance must be 0..{balance_limit_fen} fen")
    if not (4 <= len(pin) <= 12 and len(pin) % 2 == 0 and pin.isdigit()):
        raise ValueError("the PIN is 4–12 digits, an even count (BCD)")
    public = PublicData(
        issuer_id=DEMO_ISSUER_ID,
        app_type=APP_TYPE_TRANSIT,
        app_version=APP_VERSION,
        serial=serial,
        start_date=start_date,
        expiry_date=expiry_date,
    )
    state = PurseState(
        keys=card_keys(issuer, serial, algorithm, key_version),
        public_data=public.encode(),
        holder_data=holder_data,
        pin=bcd_encode(pin),
        balance=balance_fen,
        balance_limit=balance_limit_fen,
    )
    sim = Sim(iccid or _iccid_for(serial), [TransitPurse(state)], random_source=random_source)
    sim.toolkit_settings = menu if menu is not None else ToolkitSettings()
    if ota_masters is not None:
        from otar.keys import derive_kek, derive_keyset
        from otar.sim_side import OtaSecurityDomain

        keyset = derive_keyset(*ota_masters, sim.iccid)
        kek = derive_kek(ota_masters[1], sim.iccid)
        sim.ota = OtaSecurityDomain({keyset.kic_idx: keyset}, keks={keyset.kic_idx: kek})
    return sim


def personalize_driver_card(
    driver: DriverData,
    *,
    driver_master_key: bytes = DEMO_DRIVER_MASTER_KEY,
    iccid: str | None = None,
    random_source: RandomSource = os.urandom,
) -> Sim:
    auth_key = crypto.diversify(Algorithm.TDES, driver_master_key, driver.serial)
    application = DriverCard(DriverCardState(driver.encode(), auth_key))
    return Sim(iccid or _iccid_for(driver.serial), [application], random_source=random_source)


def _iccid_for(serial: bytes) -> str:
    """A test ICCID (ITU-T E.118 shape: 89 86 ..., 19 digits plus Luhn) from the serial."""
    digits = "8986" + str(int.from_bytes(serial, "big") % 10**15).zfill(15)
    return digits + _luhn_digit(digits)


def _luhn_digit(digits: str) -> str:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 0:
            value *= 2
            value -= 9 if value > 9 else 0
        total += value
    return str(-total % 10)


def demo_sim(balance_fen: int = 50_00, random_source: RandomSource = os.urandom) -> Sim:
    """A ready card for demos and benchmarks, on the documented demo keys."""
    return personalize(
        bytes.fromhex("00000000000000000001"),
        balance_fen=balance_fen,
        random_source=random_source,
    )
