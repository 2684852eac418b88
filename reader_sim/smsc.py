"""A simulated SMS centre: store-and-forward between phones and the platform's short code
(ota.md §4). SMS can be delayed, lost or duplicated — the platform must be right under all
three — so each is a setting, drawn from a seeded random source that tests replay.

The core (``SmsCentre``) keeps mailboxes in memory and takes its clock and randomness as
arguments; ``create_smsc_app`` puts HTTP around it for ``app.py smsc serve``:

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

from wallet_service.http_server import BodyRefused, request_body

user_data_bytes_max = 140  # one SMS (3GPP TS 23.040 §9.2.3.24): UDH included
mailbox_messages_max = 10_000
submit_batch_max = 100  # messages in one POST /submit
long_poll_ms_max = 30_000
lease_ms_max = 300_000
wait_slice_s_max = 1.0  # re-read the clock at least this often (tests move fake clocks)
_MSISDN = re.compile(r"^\+?[0-9]{3,20}$")


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
        wait_ms = min(max(wait_ms, 0), long_poll_ms_max)
        lease_ms = min(max(lease_ms, 0), lease_ms_max)
        deadline = self.clock() + timedelta(milliseconds=wait_ms)
        with self._lock:
            while True:
                now = self.clock()
                box = self._boxes.get(recipient, [])
                due = [sms for at, sms in box if at <= now] + self._lease_ended(recipient, now)
                if due or now >= deadline:
                    self._boxes[recipient] = [(at, sms) for at, sms in box if at > now]
                    if lease_ms:
                        until = now + timedelta(milliseconds=lease_ms)
                        leased = self._leased.setdefault(recipient, {})
                        leased.update((sms.id, (until, sms)) for sms in due)
                    return sorted(due, key=lambda sms: sms.id)
                # Sleep until the deadline, the next delayed message, a lease's end, or an
                # arrival.
                leases = self._leased.get(recipient, {}).values()
                wake_at = min([deadline, *(at for at, _ in box), *(until for until, _ in leases)])
                seconds = min((wake_at - now).total_seconds(), wait_slice_s_max)
                self._arrival(recipient).wait(timeout=seconds)

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


# The HTTP edge is plain WSGI, not Flask: every top-up crosses it some fourteen times, and
# in the end-to-end benchmark the SMS centre stands in for the outside world on the same
# two cores as the platform. Measured on its own (cheroot, one phone submitting and
# collecting): Flask took 0.91–0.99 ms of server CPU a request, this 0.50–0.60 ms.
request_bytes_max = 256 * 1024  # a full batch of submit_batch_max messages is some 40 KiB
JSON_TYPE = ("Content-Type", "application/json")


class _HttpError(Exception):
    def __init__(self, status: str, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status, self.allow = status, allow


def create_smsc_app(centre: SmsCentre) -> Callable:
    """The WSGI application around ``centre`` (routes in the module's docstring)."""

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        headers = [JSON_TYPE]
        try:
            status, body = _route(centre, environ)
        except (SmsRefused, ValueError, KeyError, TypeError) as error:
            status, body = "422 Unprocessable Entity", _error("refused", str(error))
        except _HttpError as error:
            status, body = error.status, _error(error.status[4:].lower(), str(error))
            headers += [("Allow", error.allow)] if error.allow else []
        payload = b"" if environ["REQUEST_METHOD"] == "HEAD" else json.dumps(body).encode()
        start_response(status, [*headers, ("Content-Length", str(len(payload)))])
        return [payload]

    return app


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _route(centre: SmsCentre, environ: dict) -> tuple[str, dict[str, Any]]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    parts = path.strip("/").split("/")
    if parts == ["submit"]:
        _allow(method, "POST")
        data = _json_body(environ)
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            return "202 Accepted", {
                "ids": centre.submit_many([_message(m) for m in data["messages"]])
            }
        return "202 Accepted", {"id": centre.submit_many([_message(data)])[0]}
    if parts[0] == "inbox" and len(parts) == 2:
        _allow(method, "GET")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        wait_ms, lease_ms = (int(query.get(name, ["0"])[0]) for name in ("wait_ms", "lease_ms"))
        return "200 OK", _delivered(centre.collect(parts[1], wait_ms, lease_ms))
    if parts[0] == "inbox" and len(parts) == 3 and parts[2] == "ack":
        _allow(method, "POST")
        ids = _ids(_json_body(environ))
        return "200 OK", {"acknowledged": centre.acknowledge(parts[1], ids)}
    if parts[0] == "inbox" and len(parts) == 3 and parts[2] == "next":
        _allow(method, "POST")
        data = _json_body(environ)
        ids = _ids(data, "ack", absent=[])
        outgoing = [_message(m) for m in _list(data, "submit")]
        wait_ms, lease_ms = (_int(data, name) for name in ("wait_ms", "lease_ms"))
        # (all checked above, and a refused submit stores nothing: refused, nothing done)
        submitted = centre.submit_many(outgoing) if outgoing else []
        acknowledged = centre.acknowledge(parts[1], ids)
        answer = _delivered(centre.collect(parts[1], wait_ms, lease_ms))
        return "200 OK", {"submitted": submitted, "acknowledged": acknowledged, **answer}
    if parts == ["stats"]:
        _allow(method, "GET")
        return "200 OK", {"lost": centre.lost, "duplicated": centre.duplicated}
    raise _HttpError("404 Not Found", f"no {path}")


def _allow(method: str, allowed: str) -> None:
    """(HEAD too is refused: a GET here delivers, it does not only look.)"""
    if method != allowed:
        raise _HttpError("405 Method Not Allowed", f"{allowed} only", allowed)


def _json_body(environ: dict) -> Any:
    try:
        body = request_body(environ, request_bytes_max)
    except BodyRefused as refused:
        raise _HttpError(_STATUS_LINES[refused.status], str(refused)) from None  # (400, 413)
    try:
        return json.loads(body or b"null")
    except ValueError:  # (UnicodeDecodeError too)
        raise SmsRefused("send JSON") from None


_STATUS_LINES = {400: "400 Bad Request", 413: "413 Content Too Large"}  # (RFC 9110's names)


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
