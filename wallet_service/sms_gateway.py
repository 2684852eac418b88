"""How the platform reaches phones: an SMS gateway adapter (ota.md §4). In-process over an
``SmsCentre`` for unit tests, HTTP to ``app.py smsc serve`` for the demo; an SMPP client
toward a real SMSC is the natural next adapter. Nothing here retries an answered request:
the OTA worker owns retries and timeouts (an SMS can be lost whatever the gateway says).
Only a broken connection is tried once more, on a new one — a kept-alive connection the
SMS centre closes just as it is reused fails that way, before the request was read."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from reader_sim.smsc import Outgoing, Sms, SmsCentre, is_msisdn, submit_batch_max
from wallet_service.http_client import KeepAliveClient, check_target, origin_and_target

request_timeout_s = 10.0


class SmsGateway(Protocol):
    short_code: str

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None: ...

    def send_many(self, messages: list[Outgoing]) -> None: ...

    def receive(
        self,
        wait_ms: int = 0,
        lease_ms: int = 0,
        acknowledge: list[int] | None = None,
        submit: list[Outgoing] | None = None,
    ) -> list[Sms]:
        """What came (waiting up to ``wait_ms`` for the first), each leased for
        ``lease_ms``; ``submit`` sent (all or none, up to ``submit_batch_max``) and those
        of ``acknowledge`` (leased before) acknowledged first."""
        ...

    def acknowledge(self, ids: list[int]) -> None: ...


def _chunks(messages: list[Outgoing]) -> list[list[Outgoing]]:
    """As many messages per submit as the SMS centre takes."""
    return [
        messages[start : start + submit_batch_max]
        for start in range(0, len(messages), submit_batch_max)
    ]


class InProcessGateway:
    def __init__(self, centre: SmsCentre, short_code: str) -> None:
        self.centre, self.short_code = centre, short_code

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self.centre.submit(self.short_code, to, user_data, udh)

    def send_many(self, messages: list[Outgoing]) -> None:
        for chunk in _chunks(messages):
            self.centre.submit_many([(self.short_code, *message) for message in chunk])

    def receive(
        self,
        wait_ms: int = 0,
        lease_ms: int = 0,
        acknowledge: list[int] | None = None,
        submit: list[Outgoing] | None = None,
    ) -> list[Sms]:
        if submit:
            self.send_many(submit)
        if acknowledge:
            self.acknowledge(acknowledge)
        return self.centre.collect(self.short_code, wait_ms, lease_ms)

    def acknowledge(self, ids: list[int]) -> None:
        self.centre.acknowledge(self.short_code, ids)


class GatewayError(OSError):
    """The SMS centre could not be reached, or refused the request (an OSError: callers
    treat it as the network failing, and try again later)."""


class HttpGateway:
    """Over ``KeepAliveClient`` (thread-safe, kept alive): a request costs the platform and
    every simulated phone about a fifth of the client CPU urllib3's PoolManager took
    (``bench.http_client``). A broken kept-alive connection is tried once more there."""

    def __init__(self, base_url: str, short_code: str) -> None:
        """ValueError: ``base_url`` is not an http(s) URL, ``short_code`` not an MSISDN."""
        if not is_msisdn(short_code):
            raise ValueError(f"not an MSISDN: {short_code!r}")
        self.base_url, self.short_code = base_url.rstrip("/"), short_code
        origin, target = origin_and_target(self.base_url)
        self.client = KeepAliveClient(origin)
        check_target(target)
        if "?" in target:
            raise ValueError(f"an SMS centre URL has no query: {base_url!r}")
        self.path_prefix = target.rstrip("/")  # (an SMS centre served below a path)

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None:
        self._submit(self._json(to, user_data, udh))

    def send_many(self, messages: list[Outgoing]) -> None:
        """A step's or a batch's SMS in as few requests as the SMS centre takes."""
        for chunk in _chunks(messages):
            self._submit({"messages": [self._json(*message) for message in chunk]})

    def _json(self, to: str, user_data: bytes, udh: bytes) -> dict[str, str]:
        return {"from": self.short_code, "to": to, "user_data": user_data.hex(), "udh": udh.hex()}

    def _submit(self, body: dict) -> None:
        self._request("POST", "/submit", request_timeout_s, json=body)

    def _request(self, method: str, path: str, timeout_s: float, json: object) -> dict:
        try:
            answer = self.client.request(
                method, self.path_prefix + path, timeout_s=timeout_s, json=json
            )
        except OSError as error:
            raise GatewayError(f"SMS centre {self.base_url}: {error}") from None
        if answer.status >= 300:
            raise GatewayError(f"SMS centre {self.base_url}{path}: HTTP {answer.status}")
        try:
            return answer.json()
        except ValueError:
            raise GatewayError(f"SMS centre {self.base_url}{path}: not JSON") from None

    def acknowledge(self, ids: list[int]) -> None:
        if ids:
            self._request(
                "POST", f"/inbox/{self.short_code}/ack", request_timeout_s, json={"ids": ids}
            )

    def receive(
        self,
        wait_ms: int = 0,
        lease_ms: int = 0,
        acknowledge: list[int] | None = None,
        submit: list[Outgoing] | None = None,
    ) -> list[Sms]:
        """One request: submit, acknowledge, then collect (``POST /inbox/…/next``). (More
        to submit than the SMS centre takes in one: the rest first, on their own.)"""
        body: dict = {"ack": acknowledge or [], "wait_ms": wait_ms, "lease_ms": lease_ms}
        if submit:
            riding = max(0, len(submit) - submit_batch_max)  # (the last batch rides the poll)
            self.send_many(submit[:riding])
            body["submit"] = [self._json(*message) for message in submit[riding:]]
        answer = self._request(
            "POST", f"/inbox/{self.short_code}/next", request_timeout_s + wait_ms / 1000, body
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
            for m in answer["messages"]
        ]
