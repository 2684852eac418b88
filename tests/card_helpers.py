"""Wiring for the card-level tests: a personalized SIM, a PSAM, a load host, all in memory
and deterministic (a seeded random source, fixed dates and terminal ids)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reader_sim.psam import Mac1Request, Psam, PsamKeys, verify_mac2
from sim_applet import crypto
from sim_applet.apdu import CommandApdu, split_response
from sim_applet.crypto import Algorithm
from sim_applet.image import sim_to_dict
from sim_applet.issuer import LoadAuthorization, authorize_load
from sim_applet.personalize import (
    DEMO_DRIVER_MASTER_KEY,
    DEMO_ISSUER_KEYS,
    personalize,
)
from sim_applet.purse import PurseState, TransitPurse, maintenance_mac
from sim_applet.sim import Sim
from sim_applet.structures import (
    APPLICATION_BLOCK_HEADER,
    GET_CHALLENGE,
    SFI_CAPP,
    SFI_PUBLIC,
    TRANSIT_AID,
    TYPE_CAPP_PURCHASE,
    TYPE_PURCHASE,
    CreditForLoadRequest,
    DebitForPurchaseRequest,
    DebitForPurchaseResponse,
    InitializeForLoadResponse,
    InitializeForPurchaseResponse,
    InitializeRequest,
    PublicData,
    initialize_for_load,
    initialize_for_purchase,
    read_binary,
    select_by_aid,
)

VECTORS = Path(__file__).parent / "vectors"

SERIAL = bytes.fromhex("00000000000000000042")
POS_TERMINAL_ID = bytes.fromhex("000012000001")
LOAD_TERMINAL_ID = bytes.fromhex("0000000000A1")
DATE = bytes.fromhex("20261125")
TIME = bytes.fromhex("073000")
KEY_INDEX = 1
PIN = bytes.fromhex("123456")  # personalize's DEFAULT_PIN, BCD
HOLDER_DATA = b"Wang Wei|01|110101199001011234"
OK = 0x9000

ALGORITHMS = [Algorithm.TDES, Algorithm.SM4]
ALGORITHM_IDS = ["3des", "sm4"]


def load_vectors(name: str) -> dict[str, Any]:
    document = json.loads((VECTORS / name).read_text())
    assert document.get("source"), f"{name} names no source"
    return document


def hex_bytes(text: str) -> bytes:
    return bytes.fromhex(text)


def seeded(seed: int) -> Callable[[int], bytes]:
    """A deterministic random source for the card: same seed, same card answers."""
    return random.Random(seed).randbytes


def new_sim(
    *,
    algorithm: Algorithm = Algorithm.TDES,
    balance_fen: int = 10_00,
    seed: int = 1,
    select: bool = True,
    random_source: Callable[[int], bytes] | None = None,
    **options: Any,
) -> Sim:
    """A SIM carrying the transit purse on the demo issuer keys, the purse selected."""
    sim = personalize(
        SERIAL,
        algorithm=algorithm,
        balance_fen=balance_fen,
        holder_data=HOLDER_DATA,
        random_source=random_source or seeded(seed),
        **options,
    )
    if select:
        ok(sim, select_by_aid(TRANSIT_AID))
    return sim


def new_psam(terminal_id: bytes = POS_TERMINAL_ID, terminal_seq: int = 1) -> Psam:
    keys = PsamKeys(
        {1: DEMO_ISSUER_KEYS.purchase}, DEMO_ISSUER_KEYS.maintenance, DEMO_DRIVER_MASTER_KEY
    )
    return Psam(keys, terminal_id, terminal_seq)


def purse_of(sim: Sim) -> TransitPurse:
    application = sim.application("transit_purse")
    assert isinstance(application, TransitPurse)
    return application


def state_of(sim: Sim) -> PurseState:
    return purse_of(sim).state


def snapshot(sim: Sim) -> dict[str, Any]:
    """Everything persistent on the SIM (sim_to_dict builds fresh containers)."""
    return sim_to_dict(sim)


def encode(command: CommandApdu | bytes) -> bytes:
    return command if isinstance(command, bytes) else command.encode()


def send(sim: Sim | Psam, command: CommandApdu | bytes) -> tuple[bytes, int]:
    return split_response(sim.transmit(encode(command)))


def sw_of(sim: Sim | Psam, command: CommandApdu | bytes) -> int:
    return send(sim, command)[1]


def ok(sim: Sim | Psam, command: CommandApdu | bytes) -> bytes:
    data, sw = send(sim, command)
    assert sw == OK, f"{encode(command).hex()} answered {sw:04X}"
    return data


def flip_bit(value: bytes, bit: int) -> bytes:
    """Flip bit ``bit``, counted from the least significant bit of the last byte."""
    return (int.from_bytes(value, "big") ^ (1 << bit)).to_bytes(len(value), "big")


def card_serial(sim: Sim) -> bytes:
    """As a reader learns it: from SFI 0x15 (card-application.md §1)."""
    return PublicData.decode(ok(sim, read_binary(SFI_PUBLIC))).serial


# --- load: the host side is sim_applet.issuer ----------------------------------------------


@dataclass(frozen=True)
class PreparedLoad:
    card: InitializeForLoadResponse
    authorization: LoadAuthorization
    credit: CreditForLoadRequest


def prepare_load(sim: Sim, amount: int, *, terminal_id: bytes = LOAD_TERMINAL_ID) -> PreparedLoad:
    """INITIALIZE FOR LOAD on the card; the host verifies MAC1 and computes MAC2."""
    serial = card_serial(sim)
    request = InitializeRequest(KEY_INDEX, amount, terminal_id)
    card = InitializeForLoadResponse.decode(ok(sim, initialize_for_load(request)))
    authorization = authorize_load(DEMO_ISSUER_KEYS, serial, amount, terminal_id, card)
    credit = CreditForLoadRequest(DATE, TIME, authorization.mac2(DATE, TIME))
    return PreparedLoad(card, authorization, credit)


def load(sim: Sim, amount: int) -> bytes:
    """A whole load; returns the card's TAC."""
    prepared = prepare_load(sim, amount)
    return ok(sim, prepared.credit.command())


# --- purchase: the POS side is the PSAM ----------------------------------------------------


@dataclass(frozen=True)
class PreparedPurchase:
    card: InitializeForPurchaseResponse
    mac1_request: Mac1Request
    debit: DebitForPurchaseRequest

    @property
    def transaction_type(self) -> int:
        return self.mac1_request.transaction_type


def prepare_purchase(
    sim: Sim,
    psam: Psam,
    amount: int,
    *,
    capp: bool = False,
    capp_update: tuple[int, bytes] | None = None,
) -> PreparedPurchase:
    """INITIALIZE FOR (CAPP) PURCHASE, optionally UPDATE CAPP DATA CACHE, then MAC1 from
    the PSAM: the DEBIT FOR PURCHASE is ready to send."""
    serial = card_serial(sim)
    request = InitializeRequest(KEY_INDEX, amount, psam.terminal_id)
    card = InitializeForPurchaseResponse.decode(
        ok(sim, initialize_for_purchase(request, capp=capp))
    )
    if capp_update is not None:
        record, data = capp_update
        ok(sim, update_capp_data_cache(record, data))
    mac1_request = Mac1Request(
        card.random,
        card.offline_ctc,
        amount,
        TYPE_CAPP_PURCHASE if capp else TYPE_PURCHASE,
        DATE,
        TIME,
        card.key_version,
        card.algorithm,
        serial,
    )
    answer = ok(psam, mac1_request.command())
    debit = DebitForPurchaseRequest(int.from_bytes(answer[:4], "big"), DATE, TIME, answer[4:8])
    return PreparedPurchase(card, mac1_request, debit)


def purchase(sim: Sim, psam: Psam, amount: int, **options: Any) -> DebitForPurchaseResponse:
    """A whole purchase; the PSAM verifies the card's MAC2."""
    prepared = prepare_purchase(sim, psam, amount, **options)
    answer = DebitForPurchaseResponse.decode(ok(sim, prepared.debit.command()))
    ok(psam, verify_mac2(answer.mac2))
    return answer


def update_capp_data_cache(record: int, data: bytes) -> CommandApdu:
    """`80 DC rec (SFI<<3 | 0) Lc data` (card-application.md §2)."""
    return CommandApdu(0x80, 0xDC, record, SFI_CAPP << 3, data)


# --- maintenance -----------------------------------------------------------------------------


def maintenance_command(sim: Sim, header: bytes = APPLICATION_BLOCK_HEADER) -> CommandApdu:
    """GET CHALLENGE, then APPLICATION BLOCK/UNBLOCK with the issuer's MAC (the DAMK derived
    on the host side from the maintenance master key, not read from the card)."""
    serial = card_serial(sim)
    algorithm = state_of(sim).keys.algorithm
    challenge = ok(sim, GET_CHALLENGE)
    damk = crypto.diversify(algorithm, DEMO_ISSUER_KEYS.maintenance, serial)
    mac = maintenance_mac(algorithm, damk, challenge, header)
    return CommandApdu(header[0], header[1], header[2], header[3], mac)
