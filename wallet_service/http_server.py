"""Serving an app with granian: the wallet service and the bank (``app.py serve``, ``app.py
bank serve``: WSGI) and the SMS centre (``app.py smsc serve``: RSGI, granian's own asyncio
interface, for its long polls).

granian's HTTP/1.1 server is Rust; a WSGI request's Python runs on one of a worker's
blocking threads, an RSGI request's on the worker's event loop. Measured against what each
party had before, per request, its whole process tree's CPU read from /proc by throwaway
scripts on these two cores:
- the SMS centre, ``POST /inbox/…/next`` with nothing waiting, one kept-alive client:
  80–100 µs of server CPU against cheroot's 210–310 (WSGI then; its long polls have since
  moved to RSGI, ``reader_sim.smsc``);
- the wallet service, a signed bank callback stored (8 kept-alive clients, 3,000 each run,
  access log on for both, three interleaved pairs): 1.24–1.40 ms against gunicorn
  gthread's 1.60–1.82 (2 workers × 4 threads either way).

Each worker process builds its app with ``load`` (a module-level function, called with the
settings ``serve`` was given, in the worker), and ends when the process that started it
ends, however that ends (Linux's parent-death signal): a server killed outright leaves no
worker holding its port.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

stop_wait_s = 5  # a worker not ended this long after SIGTERM is killed
_SETTINGS_VARIABLE = "WALLET_HTTP_SERVER_SETTINGS"  # (JSON) what the workers build by
_PR_SET_PDEATHSIG = 1  # prctl(2)

Loader = Callable[[dict[str, Any]], Any]  # settings → the app (WSGI, or RSGI)


class CannotListen(Exception):
    pass


def serve(
    load: Loader,
    settings: dict[str, Any],
    *,
    host: str,
    port: int,
    on_listening: Callable[[str], object],
    workers: int = 1,
    threads: int = 1,
    access_log: bool = False,
    rsgi: bool = False,
) -> None:
    """Serve ``load(settings)`` (built in each worker) until SIGTERM, SIGINT or SIGHUP.
    ``threads``: requests at once, each worker (WSGI; an RSGI app's all run on its loop).
    ``on_listening`` is told the URL before the server starts. CannotListen: the address
    is taken or not ours, or the host is not an address of this machine."""
    from granian import Granian
    from granian.constants import Interfaces

    address, url = _check_free(host, port)
    load_name = f"{load.__module__}:{load.__qualname__}"
    os.environ[_SETTINGS_VARIABLE] = json.dumps(
        {"load": load_name, "settings": settings, "parent_pid": os.getpid()}
    )
    server = Granian(
        "wallet_service.http_server",  # (a name only: ``_load_app`` builds the app)
        address=address,
        port=port,
        interface=Interfaces.RSGI if rsgi else Interfaces.WSGI,
        websockets=False,  # (none here: WSGI has none, and granian says so once at start)
        workers=workers,
        blocking_threads=1 if rsgi else threads,  # (granian's rule: 1 but for WSGI)
        workers_kill_timeout=stop_wait_s,
        log_enabled=access_log,
        log_access=access_log,
    )
    # SIGHUP ends the server too. granian's own SIGHUP starts fresh workers one by one (a
    # reload), and a SIGTERM that came meanwhile left it serving (seen, granian 2.8.9): a
    # stop must stop. The SMS centre's mailboxes, besides, live in its one worker.
    server.signal_handler_reload = server.signal_handler_interrupt  # type: ignore[method-assign]
    on_listening(url)
    try:
        server.serve(target_loader=_load_app)
    except RuntimeError as error:  # (granian's own bind: the check above does the rest)
        raise CannotListen(f"cannot listen on {host}:{port}: {error}") from None


class BodyRefused(ValueError):
    """A request body not read: ``status`` is the HTTP status to answer (400, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_body(environ: dict, bytes_max: int) -> bytes:
    """A WSGI request's body, for the routes answered in plain WSGI: at most ``bytes_max``
    bytes — by its Content-Length, or to its end when the server knows where that is (a
    chunked body: the server's ``wsgi.input_terminated``, which granian sets). BodyRefused:
    larger, or a Content-Length that is not a whole number."""
    declared = declared_length(environ.get("CONTENT_LENGTH") or "", bytes_max)
    if declared is not None:
        return environ["wsgi.input"].read(declared)
    if not environ.get("wsgi.input_terminated"):
        return b""
    body = environ["wsgi.input"].read(bytes_max + 1)
    if len(body) > bytes_max:
        raise too_large(bytes_max)
    return body


def declared_length(content_length: str, bytes_max: int) -> int | None:
    """A request's Content-Length header as a number of bytes (None: there is none), for
    a body to be read whole (WSGI's, or the SMS centre's RSGI one). BodyRefused: not a
    whole number (400), or larger than ``bytes_max`` (413: the body is refused unread)."""
    if not content_length:
        return None
    if not content_length.isascii() or not content_length.isdigit():
        raise BodyRefused(400, "Content-Length is a whole number")
    if int(content_length) > bytes_max:
        raise too_large(bytes_max)
    return int(content_length)


def too_large(bytes_max: int) -> BodyRefused:
    return BodyRefused(413, f"a request body is at most {bytes_max} bytes here")


def json_answer(
    start_response: Callable, status: int, body: bytes, headers: dict[str, str] | None = None
) -> list[bytes]:
    """A plain-WSGI route's answer: ``body`` (JSON) with its status, length and ``headers``."""
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or {}).items(),
        ],
    )
    return [body]


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
    """(granian's loader, in its worker process.) The app ``serve`` was given the loader
    and settings of — built here, not imported by a path, which would depend on the
    directory the server started in."""
    import importlib

    given = _taken_from_the_environment()
    end_with(given["parent_pid"])
    module, _, name = given["load"].partition(":")
    return getattr(importlib.import_module(module), name)(given["settings"])


def _taken_from_the_environment() -> dict[str, Any]:
    """(In the worker, before granian copies the environment into every request's WSGI
    environ.) The settings, taken out of it — they may hold a secret (the bank's); and
    no ``HTTP_*`` variable left, which a request without that header would seem to carry."""
    given = json.loads(os.environ.pop(_SETTINGS_VARIABLE))
    for name in [name for name in os.environ if name.startswith("HTTP_")]:
        del os.environ[name]
    return given


def end_with(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends (prctl PR_SET_PDEATHSIG; Linux): a
    granian worker, or bench.ota's phones. A granian worker is forked with granian's
    parent handlers, which only note a signal for a loop the worker does not run: until
    granian sets its own, the defaults end it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # it ended before the signal was asked for
        os._exit(1)
