"""Wiring for reader-side tests: a card, a POS and a load terminal, all deterministic."""

from __future__ import annotations

import http.server
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import requests

from reader_sim.link import InMemoryLink
from reader_sim.load_terminal import Loaded, LoadTerminal
from reader_sim.pos import BusPos, PosConfig
from reader_sim.pos_file import demo_psam_keys
from reader_sim.psam import Psam
from reader_sim.records import RecordStore
from sim_applet.crypto import Algorithm
from sim_applet.driver_card import DriverData
from sim_applet.personalize import DEMO_ISSUER_KEYS, personalize, personalize_driver_card
from sim_applet.purse import PurseState, TransitPurse
from sim_applet.sim import Sim

OPERATOR = "BUS-CO-1"
POS_TERMINAL_ID = bytes.fromhex("000012000001")
COUNTER_TERMINAL_ID = bytes.fromhex("0000000000A1")
FARE_FEN = 200


def seeded(seed: int = 7):  # type: ignore[no-untyped-def]
    return random.Random(seed).randbytes


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime(2026, 11, 25, 7, 30, 0))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def new_card(
    serial_tail: int = 1,
    *,
    algorithm: Algorithm = Algorithm.TDES,
    balance_fen: int = 0,
    seed: int = 1,
    **options: object,
) -> Sim:
    serial = serial_tail.to_bytes(10, "big")
    return personalize(
        serial,
        algorithm=algorithm,
        balance_fen=balance_fen,
        random_source=seeded(seed),
        **options,  # type: ignore[arg-type]
    )


def purse(sim: Sim) -> PurseState:
    application = sim.application("transit_purse")
    assert isinstance(application, TransitPurse)
    return application.state


def new_driver_card(driver_id: str = "D007", operator: str = OPERATOR, **options: object) -> Sim:
    data = DriverData(
        bytes.fromhex("D0000000000000000007"),
        driver_id,
        operator,
        "F1",
        "Wang Wei",
        date(2036, 12, 31),
    )
    return personalize_driver_card(data, random_source=seeded(3), **options)  # type: ignore[arg-type]


def new_pos(
    store: RecordStore | None = None,
    *,
    clock: Clock | None = None,
    terminal_id: bytes = POS_TERMINAL_ID,
    fare_fen: int = FARE_FEN,
    signed_in: bool = True,
    **config: object,
) -> BusPos:
    pos = BusPos(
        PosConfig(OPERATOR, "12", "V-1201", fare_fen, **config),  # type: ignore[arg-type]
        Psam(demo_psam_keys(), terminal_id),
        store if store is not None else RecordStore(),
        clock=clock or Clock(),
        random_source=seeded(5),
    )
    if signed_in and pos.driver is None:
        outcome = pos.present(InMemoryLink(new_driver_card()))
        assert outcome.outcome.name == "SIGNED_IN", outcome
    return pos


def load(sim: Sim, amount_fen: int, clock: Clock | None = None) -> Loaded:
    terminal = LoadTerminal(DEMO_ISSUER_KEYS, COUNTER_TERMINAL_ID, clock or Clock())
    result = terminal.load(InMemoryLink(sim), amount_fen)
    assert isinstance(result, Loaded), result
    return result


def store_at(tmp_path: Path, records_max: int = 100_000) -> RecordStore:
    return RecordStore(tmp_path / "pos.sqlite", records_max=records_max)


def wait_until_up(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> bool:
    """True once ``GET url`` answers 2xx; False when ``timeout_s`` passes, or ``process``
    (the server) exits, first. Refused connections and slow answers (a busy machine: a
    server still importing) both mean "not yet"."""
    deadline = time.monotonic() + timeout_s
    while process is None or process.poll() is None:
        try:
            if requests.get(url, timeout=1).ok:
                return True
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A throwaway HTTP server on loopback answering with ``handler``, in a thread: its
    base URL, while the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
