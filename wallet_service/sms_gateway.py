"""How the platform reaches phones: an SMS gateway adapter (ota.md §4). In-process over an
``SmsCentre`` for unit tests, HTTP to ``app.py smsc serve`` for the demo; an SMPP client
toward a real SMSC is the natural next adapter. Nothing here retries an answered request:
the OTA worker owns retries and timeouts (an SMS can be lost whatever the gateway says).
Only a broken connection is tried once more, on a new one — a kept-alive connection the
SMS centre closes just as it is reused fails that way, before the request was read."""

from __future__ import annotations

import threading
from typing import Protocol

import requests

from reader_sim.smsc import Sms, SmsCentre, submit_batch_max

request_timeout_s = 10.0
Outgoing = tuple[str, bytes, bytes]  # (to, user_data, udh)


class SmsGateway(Protocol):
    short_code: str

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None: ...

    def send_many(self, messages: list[Outgoing]) -> None: ...

    def receive(self, wait_ms: int = 0) -> list[Sms]: ...


class InProcessGateway:
    def __init__(self, centre: SmsCentre, short_code: str) -> None:
        self.centre, self.short_code = centre, short_code

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self.centre.submit(self.short_code, to, user_data, udh)

    def send_many(self, messages: list[Outgoing]) -> None:
        self.centre.submit_many([(self.short_code, *message) for message in messages])

    def receive(self, wait_ms: int = 0) -> list[Sms]:
        return self.centre.collect(self.short_code, wait_ms)


class HttpGateway:
    def __init__(self, base_url: str, short_code: str) -> None:
        self.base_url, self.short_code = base_url.rstrip("/"), short_code
        self._local = threading.local()  # a requests.Session per thread: not thread-safe

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.trust_env = False  # no proxy lookup per request: loopback
        return self._local.session

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self._submit(self._json(to, user_data, udh))

    def send_many(self, messages: list[Outgoing]) -> None:
        """A step's or a batch's SMS in as few requests as the SMS centre takes."""
        for start in range(0, len(messages), submit_batch_max):
            chunk = messages[start : start + submit_batch_max]
            self._submit({"messages": [self._json(*message) for message in chunk]})

    def _json(self, to: str, user_data: bytes, udh: bytes) -> dict[str, str]:
        return {"from": self.short_code, "to": to, "user_data": user_data.hex(), "udh": udh.hex()}

    def _submit(self, body: dict) -> None:
        self._request("POST", "/submit", json=body, timeout=request_timeout_s)

    def _request(self, method: str, path: str, **options) -> requests.Response:  # type: ignore[no-untyped-def]
        try:
            answer = self.session.request(method, self.base_url + path, **options)
        except requests.ConnectionError:
            del self._local.session  # its pooled connection is dead: start afresh
            answer = self.session.request(method, self.base_url + path, **options)
        answer.raise_for_status()
        return answer

    def receive(self, wait_ms: int = 0) -> list[Sms]:
        from datetime import datetime

        answer = self._request(
            "GET",
            f"/inbox/{self.short_code}",
            params={"wait_ms": wait_ms},
            timeout=request_timeout_s + wait_ms / 1000,
        )
        return [
            Sms(
                m["id"],
                m["from"],
                m["to"],
                bytes.fromhex(m["udh"]),
                bytes.fromhex(m["user_data"]),
                datetime.fromisoformat(m["submitted_at"]),
            )
            for m in answer.json()["messages"]
        ]
