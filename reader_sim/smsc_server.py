"""``app.py smsc serve``: the SMS centre's RSGI app (``reader_sim.smsc``) served by granian
(``wallet_service.http_server``).

Every top-up crosses the SMS centre some five times, and in ``bench.ota`` it runs on the
platform's two cores. A long poll waits on the worker's event loop, not on a thread: the
phones waiting at once are not bounded by threads but by granian's backpressure, 1,024
connections (its backlog ÷ workers; each phone keeps one alive), and by open files. One
worker: the mailboxes are in its memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from reader_sim.smsc import Faults, SmsCentre, SmsCentreApp
from wallet_service.http_server import serve as serve_app


@dataclass(frozen=True)
class Settings:
    delay_ms: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    seed: int = 0


def serve(host: str, port: int, settings: Settings, on_listening: Callable[[str], object]) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP. CannotListen: the address is taken or not
    ours, or the host is not an address of this machine."""
    serve_app(
        _load_app,
        asdict(settings),
        host=host,
        port=port,
        on_listening=lambda url: on_listening(f"SMS centre on {url}"),
        rsgi=True,
    )


def _load_app(settings: dict[str, Any]) -> SmsCentreApp:
    """(In granian's worker process.) The SMS centre, as ``serve`` was asked for it."""
    given = Settings(**settings)
    faults = Faults(given.delay_ms, given.loss, given.duplicate)
    return SmsCentreApp(SmsCentre(faults, random=random.Random(given.seed)))
