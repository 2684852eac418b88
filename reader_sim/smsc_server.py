"""``app.py smsc serve``: the SMS centre's WSGI app (``reader_sim.smsc``) served by granian.

Every top-up crosses the SMS centre some nine times, and in ``bench.ota`` it runs on the
platform's two cores. granian's HTTP server is Rust: per request it took a third of
cheroot's server CPU (80–100 µs against 210–310 µs, ``POST /inbox/…/next`` with nothing
waiting, one kept-alive client; a throwaway script reading the servers' CPU from /proc).
A long poll holds one of granian's blocking threads while it waits, as it held one of
cheroot's threads.

granian serves from a worker process of its own, which builds the app (``_load_app``)
from the settings in its environment (``SETTINGS_VARIABLE``), and it ends when the process
that started it ends, however that ends (Linux's parent-death signal) — a server killed
outright leaves no worker holding its port.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass

from reader_sim.smsc import Faults, SmsCentre, create_smsc_app

blocking_threads = 128  # requests at once: each long-polling phone holds one while it waits
stop_wait_s = 5  # a worker not ended this long after SIGTERM is killed
SETTINGS_VARIABLE = "SMSC_SERVE_SETTINGS"  # (JSON) what the worker process builds its app by
_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class Settings:
    delay_ms: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    seed: int = 0
    parent_pid: int = 0  # the process whose end ends the worker (set by ``serve``)


class CannotListen(Exception):
    pass


def serve(host: str, port: int, settings: Settings, on_listening: Callable[[str], object]) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP. CannotListen: the address is taken or not
    ours, or the host is not an address of this machine."""
    from granian import Granian
    from granian.constants import Interfaces

    address, url = _check_free(host, port)
    os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings) | {"parent_pid": os.getpid()})
    server = Granian(
        "reader_sim.smsc_server",  # (a name only: ``_load_app`` builds the app)
        address=address,
        port=port,
        interface=Interfaces.WSGI,
        workers=1,  # one SMS centre: its mailboxes are in memory
        blocking_threads=blocking_threads,
        workers_kill_timeout=stop_wait_s,
        log_enabled=False,
    )
    # SIGHUP: granian would start a second worker with empty mailboxes and drop the first's
    # (a reload); here it ends the SMS centre, as the other signals do.
    server.signal_handler_reload = server.signal_handler_interrupt  # type: ignore[method-assign]
    on_listening(f"SMS centre on {url}")
    try:
        server.serve(target_loader=_load_app)
    except RuntimeError as error:  # (granian's own bind: the check above does the rest)
        raise CannotListen(f"cannot listen on {host}:{port}: {error}") from None


def _check_free(host: str, port: int) -> tuple[str, str]:
    """The address granian is to bind (it takes IP addresses only) and the URL it will
    answer on. Taken, granian would fail with a traceback; this says so in one line."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.create_server(sockaddr[:2], family=family):
            pass
    except OSError as error:
        raise CannotListen(f"cannot listen on {host}:{port}: {error}") from None
    address = sockaddr[0]
    return address, f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def _load_app(_target: str) -> Callable:
    """(granian's loader, in its worker process.) The app, as ``serve`` was asked for it —
    built here, not imported by a path, which would depend on the directory it started in."""
    settings = Settings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    _end_with(settings.parent_pid)
    faults = Faults(settings.delay_ms, settings.loss, settings.duplicate)
    return create_smsc_app(SmsCentre(faults, random=random.Random(settings.seed)))


def _end_with(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends (prctl PR_SET_PDEATHSIG; Linux). The
    worker is forked with granian's parent handlers, which only note a signal for a loop
    the worker does not run: until granian sets its own, the defaults end it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # it ended before the signal was asked for
        os._exit(1)
