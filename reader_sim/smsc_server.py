"""``app.py smsc serve``: the SMS centre's WSGI app (``reader_sim.smsc``) served by granian
(``wallet_service.http_server``: per request a third of cheroot's server CPU).

Every top-up crosses the SMS centre some nine times, and in ``bench.ota`` it runs on the
platform's two cores. A long poll holds one of granian's blocking threads while it waits,
as it held one of cheroot's threads. One worker: the mailboxes are in its memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from reader_sim.smsc import Faults, SmsCentre, create_smsc_app
from wallet_service.http_server import serve as serve_wsgi

# Requests at once. A long poll holds one of granian's blocking threads while it waits, so
# this is how many phones can wait at once with room left for submits: with 128, once 128
# polls waited, every other poll and submit queued behind them (bench.ota at 192 phones:
# 29 top-ups/s, 79 % of the machine idle). granian starts a thread when a request needs
# one and ends it after 30 s idle: the bound costs nothing while it is not reached. (Past
# 1024, granian's own bound on requests at once, its backpressure — backlog ÷ workers —
# would have to rise too.)
blocking_threads = 1024


@dataclass(frozen=True)
class Settings:
    delay_ms: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    seed: int = 0


def serve(host: str, port: int, settings: Settings, on_listening: Callable[[str], object]) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP. CannotListen: the address is taken or not
    ours, or the host is not an address of this machine."""
    serve_wsgi(
        _load_app,
        asdict(settings),
        host=host,
        port=port,
        on_listening=lambda url: on_listening(f"SMS centre on {url}"),
        threads=blocking_threads,
    )


def _load_app(settings: dict[str, Any]) -> Callable:
    """(In granian's worker process.) The SMS centre, as ``serve`` was asked for it."""
    given = Settings(**settings)
    faults = Faults(given.delay_ms, given.loss, given.duplicate)
    return create_smsc_app(SmsCentre(faults, random=random.Random(given.seed)))
