"""A simulated SMS centre: store-and-forward between phones and the platform's short code
(ota.md §4). SMS can be delayed, lost or duplicated — the platform must be right under all
three — so each is a setting, drawn from a seeded random source that tests replay.

The core (``SmsCentre``) keeps mailboxes in memory and takes its clock and randomness as
arguments; ``SmsCentreApp`` puts HTTP around it for ``app.py smsc serve``:

    POST /submit   {"from": MSISDN, "to": MSISDN, "user_data": HEX, "udh": HEX?} → {"id"}
                   {"messages": [those, …]} → {"ids"}: all accepted, or none
    GET  /inbox/<msisdn>?wait_ms=N  → {"messages": [...]} (delivered: removed from the box)
    GET  /inbox/<msisdn>?wait_ms=N&lease_ms=M → the same, each message held for M ms
                   until acknowledged, then delivered again (SMPP: an SMSC retries a
                   deliver_sm until the receiver's deliver_sm_resp)
    POST /inbox/<msisdn>/ack {"ids": [...]} → {"acknowledged": n}
    POST /inbox/<msisdn>/next {"submit": [messages], "ack": [ids], "wait_ms": N,
                   "lease_ms": M} → those submitted (all or none, as POST /submit) and
                   those acknowledged, then the same as GET /inbox (a receiver's loop:
                   one request a batch, not three — Kafka's consumers commit in their
                   poll too; a phone's proof of receipt rides its next poll)
    GET  /stats    → {"lost": n, "duplicated": n}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from wallet_service.http_server import BodyRefused, declared_length, too_large

user_data_bytes_max = 140  # one SMS (3GPP TS 23.040 §9.2.3.24): UDH included
mailbox_messages_max = 10_000
submit_batch_max = 100  # messages in one POST /submit
long_poll_ms_max = 30_000
lease_ms_max = 300_000
wait_slice_s_max = 1.0  # re-read the clock at least this often (tests move fake clocks)
_MSISDN = re.compile(r"^\+?[0-9]{3,20}$")


def waited_s(wait_ms: int) -> float:
    """How long a poll asking to wait ``wait_ms`` waits at most: 0 to ``long_poll_ms_max``."""
    return min(max(wait_ms, 0), long_poll_ms_max) / 1000


def is_msisdn(address: str) -> bool:
    return _MSISDN.match(address) is not None


class SmsRefused(ValueError):
    pass


def _check(sender: str, recipient: str, user_data: bytes, udh: bytes) -> None:
    for address in (sender, recipient):
        if not is_msisdn(address):
            raise SmsRefused(f"not an MSISDN: {address!r}")
    if len(udh) + len(user_data) > user_data_bytes_max:
        raise SmsRefused(f"more than {user_data_bytes_max} bytes of user data")


Outgoing = tuple[str, bytes, bytes]  # (to, user_data, udh): an SMS to send, its sender known


@dataclass(frozen=True)
class Sms:
    id: int
    sender: str
    recipient: str
    udh: bytes
    user_data: bytes
    submitted_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": self.sender,
            "to": self.recipient,
            "udh": self.udh.hex(),
            "user_data": self.user_data.hex(),
            "submitted_at": self.submitted_at.isoformat(),
        }


@dataclass
class Faults:
    delay_ms: int = 0
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.loss_rate <= 1 or not 0 <= self.duplicate_rate <= 1:
            raise ValueError("delay ≥ 0 ms, rates within 0..1")


@dataclass
class SmsCentre:
    faults: Faults = field(default_factory=Faults)
    clock: Callable[[], datetime] = datetime.now
    random: random.Random = field(default_factory=lambda: random.Random(0))
    _boxes: dict[str, list[tuple[datetime, Sms]]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # One condition per mailbox, on the one lock: a message wakes its recipient only.
    _arrivals: dict[str, threading.Condition] = field(default_factory=dict)
    # Delivered under a lease, not acknowledged yet: recipient → id → (lease end, message).
    _leased: dict[str, dict[int, tuple[datetime, Sms]]] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    # Told the recipient each time a message is stored, on the thread that stores it and
    # with the lock held (it must not take it): the HTTP edge's long polls, futures on its
    # event loop, learn of an arrival here — its stores are all made on that loop.
    on_arrival: Callable[[str], None] | None = None

    def submit(self, sender: str, recipient: str, user_data: bytes, udh: bytes = b"") -> int:
        return self.submit_many([(sender, recipient, user_data, udh)])[0]

    def submit_many(self, messages: list[tuple[str, str, bytes, bytes]]) -> list[int]:
        """Accept a batch — all of it or, if one is malformed, none of it (what an HTTP
        gateway's multi-message submit does); each then meets the faults on its own."""
        if len(messages) > submit_batch_max:
            raise SmsRefused(f"more than {submit_batch_max} messages in one submit")
        for sender, recipient, user_data, udh in messages:
            _check(sender, recipient, user_data, udh)
        with self._lock:
            arriving = Counter(recipient for _, recipient, _, _ in messages)
            for recipient, count in arriving.items():
                if len(self._boxes.get(recipient, [])) + count > mailbox_messages_max:
                    raise SmsRefused(f"mailbox of {recipient} is full")
            return [self._store(*message) for message in messages]

    def _store(self, sender: str, recipient: str, user_data: bytes, udh: bytes) -> int:
        """(Called with the lock held, room for one copy checked.)"""
        sms = Sms(next(self._ids), sender, recipient, udh, user_data, self.clock())
        if self.random.random() < self.faults.loss_rate:
            self.lost += 1
            return sms.id  # accepted, then lost: the sender cannot tell
        box = self._boxes.setdefault(recipient, [])
        duplicate = self.random.random() < self.faults.duplicate_rate
        copies = 2 if duplicate and len(box) < mailbox_messages_max - 1 else 1
        self.duplicated += copies - 1
        due = sms.submitted_at + timedelta(milliseconds=self.faults.delay_ms)
        box.extend([(due, sms)] * copies)
        self._arrival(recipient).notify_all()
        if self.on_arrival is not None:
            self.on_arrival(recipient)
        return sms.id

    def _arrival(self, recipient: str) -> threading.Condition:
        """(Called with the lock held.)"""
        if recipient not in self._arrivals:
            self._arrivals[recipient] = threading.Condition(self._lock)
        return self._arrivals[recipient]

    def collect(self, recipient: str, wait_ms: int = 0, lease_ms: int = 0) -> list[Sms]:
        """Deliver what is due for ``recipient`` (removing it), waiting up to ``wait_ms``.
        With ``lease_ms``, each message delivered comes again after that long unless
        acknowledged (``acknowledge``) — at least once, for a receiver that may die."""
        deadline = self.clock() + timedelta(seconds=waited_s(wait_ms))
        with self._lock:
            while True:
                now = self.clock()
                due = self._deliver_due(recipient, now, lease_ms)
                if due or now >= deadline:
                    return due
                wake_at = min(deadline, self._next_change(recipient) or deadline)
                seconds = min((wake_at - now).total_seconds(), wait_slice_s_max)
                self._arrival(recipient).wait(timeout=seconds)

    def collect_now(self, recipient: str, lease_ms: int = 0) -> tuple[list[Sms], datetime | None]:
        """What is due for ``recipient`` now, delivered as ``collect`` delivers it, without
        waiting; and, when nothing is, the time something may become due without an
        arrival (a delayed message, a lease's end) — for a waiter that waits elsewhere."""
        with self._lock:
            due = self._deliver_due(recipient, self.clock(), lease_ms)
            return due, None if due else self._next_change(recipient)

    def _deliver_due(self, recipient: str, now: datetime, lease_ms: int) -> list[Sms]:
        """(Called with the lock held.) What is due, taken out of the mailbox (and leased
        for ``lease_ms``), in the order it was submitted."""
        box = self._boxes.get(recipient, [])
        due = [sms for at, sms in box if at <= now] + self._lease_ended(recipient, now)
        if due:
            self._boxes[recipient] = [(at, sms) for at, sms in box if at > now]
            lease_ms = min(max(lease_ms, 0), lease_ms_max)
            if lease_ms:
                until = now + timedelta(milliseconds=lease_ms)
                leased = self._leased.setdefault(recipient, {})
                leased.update((sms.id, (until, sms)) for sms in due)
        return sorted(due, key=lambda sms: sms.id)

    def _next_change(self, recipient: str) -> datetime | None:
        """(Called with the lock held.) When the next delayed message falls due or the next
        lease ends, if any does."""
        leases = self._leased.get(recipient, {}).values()
        times = [*(at for at, _ in self._boxes.get(recipient, [])), *(at for at, _ in leases)]
        return min(times, default=None)

    def _lease_ended(self, recipient: str, now: datetime) -> list[Sms]:
        """(Called with the lock held.) Messages whose lease ended unacknowledged."""
        leased = self._leased.get(recipient, {})
        ended = [sms for until, sms in leased.values() if until <= now]
        for sms in ended:
            del leased[sms.id]
        return ended

    def acknowledge(self, recipient: str, ids: list[int]) -> int:
        """The receiver has taken these for good; how many were still leased."""
        with self._lock:
            leased = self._leased.get(recipient, {})
            return sum(leased.pop(int(sms_id), None) is not None for sms_id in ids)


# The HTTP edge is granian's RSGI on one asyncio loop, not WSGI: a long poll waits as a
# future on the loop, not as a thread parked on a condition. Every top-up crosses the SMS
# centre some five times for a phone's polls and submits, and in the end-to-end benchmark
# it runs on the platform's two cores: over WSGI (a blocking thread a request, 512 phones
# polling) it took 1.2–1.7 ms of CPU a top-up, here 0.9–1.1 (bench.ota, interleaved).
request_bytes_max = 256 * 1024  # a full batch of submit_batch_max messages is some 40 KiB
JSON_TYPE = ("content-type", "application/json")
# A poll woken for a delayed message or a lease's end wakes this much after it: uvloop's
# timers round to the millisecond, and one that fired early would poll again at once.
timer_margin_s = 0.001


class _HttpError(Exception):
    def __init__(self, status: int, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status, self.allow = status, allow


_STATUS_CODES = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: "content too large",
}  # fmt: skip  (RFC 9110's names)


@dataclass(frozen=True)
class _Poll:
    """A route's answer that waits: what ``fields`` says, and the messages for
    ``recipient`` — those due now or, if none is, the first to come within ``wait_ms``."""

    recipient: str
    wait_ms: int
    lease_ms: int
    fields: dict[str, Any]


class SmsCentreApp:
    """The RSGI application around ``centre`` (routes in the module's docstring). Its
    requests run on one event loop, and ``centre`` is touched from that loop only: its
    arrivals (``on_arrival``) wake the waiting polls from there."""

    def __init__(self, centre: SmsCentre) -> None:
        self.centre = centre
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        centre.on_arrival = self._wake

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        headers = [JSON_TYPE]
        try:
            endpoint, box = _endpoint(scope.method, scope.path)  # (404, 405: body unread)
            body = await _body(scope, protocol) if scope.method == "POST" else b""
            routed = _route(self.centre, endpoint, box, scope.query_string, body)
            if isinstance(routed, _Poll):
                status, answer = 200, await self._poll(routed, protocol)
            else:
                status, answer = routed
        except (_HttpError, BodyRefused) as error:  # (before ValueError: a BodyRefused is one)
            status, answer = error.status, _error(_STATUS_CODES[error.status], str(error))
            allow = getattr(error, "allow", None)
            headers += [("allow", allow)] if allow else []
        except (SmsRefused, ValueError, KeyError, TypeError) as error:
            status, answer = 422, _error("refused", str(error))
        except _ClientGone:
            return  # (nothing taken for it: what came waits for its next poll)
        payload = b"" if scope.method == "HEAD" else json.dumps(answer).encode()
        protocol.response_bytes(status, [*headers, ("content-length", str(len(payload)))], payload)

    async def _poll(self, poll: _Poll, protocol: Any) -> dict[str, Any]:
        """Wait on the loop (not on the centre's lock) until something is due, an arrival
        woke this recipient, or ``wait_ms`` is over. _ClientGone: the client left while it
        waited — what came meanwhile is left for its next poll, not taken and dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + waited_s(poll.wait_ms)
        gone: asyncio.Future[None] | None = None  # the client leaving, watched once it waits
        try:
            while True:
                if gone is not None and gone.done():
                    raise _ClientGone
                due, next_change = self.centre.collect_now(poll.recipient, poll.lease_ms)
                left_s = deadline - loop.time()
                if due or left_s <= 0:
                    return {**poll.fields, **_delivered(due)}
                if next_change is not None:
                    until_change_s = (next_change - self.centre.clock()).total_seconds()
                    left_s = min(left_s, until_change_s + timer_margin_s)
                if gone is None:
                    gone = asyncio.ensure_future(protocol.client_disconnect())
                await self._arrival_or_timeout(poll.recipient, max(left_s, 0.0), gone)
        finally:
            if gone is not None:
                gone.cancel()

    async def _arrival_or_timeout(
        self, recipient: str, seconds: float, gone: asyncio.Future[None]
    ) -> None:
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        self._waiting.setdefault(recipient, []).append(arrived)
        timer = loop.call_later(seconds, _resolve, arrived)
        wake = lambda _: _resolve(arrived)  # noqa: E731  (the client left: stop waiting)
        gone.add_done_callback(wake)
        try:
            await arrived
        finally:
            timer.cancel()
            gone.remove_done_callback(wake)
            waiting = self._waiting.get(recipient, [])
            if arrived in waiting:
                waiting.remove(arrived)
                if not waiting:
                    del self._waiting[recipient]

    def _wake(self, recipient: str) -> None:
        for arrived in self._waiting.pop(recipient, []):
            _resolve(arrived)


class _ClientGone(Exception):
    """The client of a waiting poll closed its connection."""


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _body(scope: Any, protocol: Any) -> bytes:
    """The request's body: at most ``request_bytes_max`` bytes, by its Content-Length (a
    larger one refused unread) or else to its end (chunked; HTTP/2's frames). BodyRefused
    as ``http_server.request_body`` refuses one."""
    declared = declared_length(scope.headers.get("content-length") or "", request_bytes_max)
    if declared is not None:
        return await protocol()
    if scope.http_version.startswith("1") and "transfer-encoding" not in scope.headers:
        return b""  # (HTTP/1.x with neither: no body, RFC 9112 §6.3)
    body = bytearray()
    async for chunk in protocol:
        body += chunk
        if len(body) > request_bytes_max:
            raise too_large(request_bytes_max)
    return bytes(body)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _endpoint(method: str, path: str) -> tuple[str, str]:
    """(The route, the mailbox it names or ""), its method checked: 404, 405 otherwise."""
    parts = path.strip("/").split("/")
    if parts == ["submit"]:
        return _allow(method, "POST", "submit"), ""
    if parts[0] == "inbox" and len(parts) == 2:
        return _allow(method, "GET", "collect"), parts[1]
    if parts[0] == "inbox" and len(parts) == 3 and parts[2] in ("ack", "next"):
        return _allow(method, "POST", parts[2]), parts[1]
    if parts == ["stats"]:
        return _allow(method, "GET", "stats"), ""
    raise _HttpError(404, f"no {path}")


def _route(
    centre: SmsCentre, endpoint: str, box: str, query_string: str, body: bytes
) -> tuple[int, dict[str, Any]] | _Poll:
    if endpoint == "submit":
        data = _json(body)
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            return 202, {"ids": centre.submit_many([_message(m) for m in data["messages"]])}
        return 202, {"id": centre.submit_many([_message(data)])[0]}
    if endpoint == "collect":
        query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
        wait_ms, lease_ms = (int(query.get(name, ["0"])[0]) for name in ("wait_ms", "lease_ms"))
        return _Poll(box, wait_ms, lease_ms, {})
    if endpoint == "ack":
        return 200, {"acknowledged": centre.acknowledge(box, _ids(_json(body)))}
    if endpoint == "next":
        data = _json(body)
        ids = _ids(data, "ack", absent=[])
        outgoing = [_message(m) for m in _list(data, "submit")]
        wait_ms, lease_ms = (_int(data, name) for name in ("wait_ms", "lease_ms"))
        # (all checked above, and a refused submit stores nothing: refused, nothing done)
        submitted = centre.submit_many(outgoing) if outgoing else []
        acknowledged = centre.acknowledge(box, ids)
        return _Poll(box, wait_ms, lease_ms, {"submitted": submitted, "acknowledged": acknowledged})
    return 200, {"lost": centre.lost, "duplicated": centre.duplicated}  # (stats)


def _allow(method: str, allowed: str, endpoint: str) -> str:
    """``endpoint``, if asked with its method. (HEAD too is refused: a GET here delivers,
    it does not only look.)"""
    if method != allowed:
        raise _HttpError(405, f"{allowed} only", allowed)
    return endpoint


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:  # (UnicodeDecodeError too)
        raise SmsRefused("send JSON") from None


def _ids(data: Any, key: str = "ids", absent: list[int] | None = None) -> list[int]:
    """``data[key]``, a list of integers (``absent`` when the key is, if given)."""
    ids = data.get(key, absent) if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise SmsRefused(f'send {{"{key}": [integers]}}')
    return ids


def _list(data: dict, key: str) -> list[Any]:
    """``data[key]``, a list (empty when the key is absent)."""
    value = data.get(key, [])
    if not isinstance(value, list):
        raise SmsRefused(f"{key} is a list")
    return value


def _int(data: dict, key: str) -> int:
    value = data.get(key, 0)
    if type(value) is not int:
        raise SmsRefused(f"{key} is a whole number of milliseconds")
    return value


def _delivered(messages: list[Sms]) -> dict[str, Any]:
    return {"messages": [sms.to_json() for sms in messages]}


def _message(data: Any) -> tuple[str, str, bytes, bytes]:
    if not isinstance(data, dict):
        raise SmsRefused('send a JSON object (or {"messages": [objects]})')
    return (
        str(data["from"]),
        str(data["to"]),
        bytes.fromhex(str(data["user_data"])),
        bytes.fromhex(str(data.get("udh", ""))),
    )
