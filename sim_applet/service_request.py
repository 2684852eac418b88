"""Requests the SIM sends the platform by SMS (ota.md §5 step 1), sans I/O: a top-up or a
loss report, authenticated by the card's own load key so that a passenger can ask only
for the card in their own phone.

Project-defined encoding (documented in the README), 30 bytes of SMS user data, no UDH:

    magic "BUSR" (4) · version 01 (1) · kind (1: 01 top-up, 02 loss report) ·
    application serial (10) · amount in fen (4, big-endian; 0 for a loss report) ·
    request id (4, random) · online CTC (2) · MAC (4)

MAC: the first 4 bytes of the PBOC CBC-MAC (card-application.md §3, ISO 9797-1 method 2
padding, zero ICV) over every byte before it, under a session key made as INITIALIZE FOR
LOAD makes one — ``load_session_key(DLK, request id, online CTC)`` — so the key never
travels and each request's key differs. The platform re-derives DLK from its load master.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum

from sim_applet.crypto import Algorithm, cbc_mac, load_session_key

MAGIC = b"BUSR"
VERSION = 1
request_bytes = 30
mac_bytes = 4
request_amount_fen_max = 0xFFFFFFFF


class RequestKind(IntEnum):
    TOP_UP = 1
    LOSS_REPORT = 2


class RequestInvalid(ValueError):
    """Not a well-formed service request, or its MAC does not verify."""


@dataclass(frozen=True)
class ServiceRequest:
    kind: RequestKind
    serial: bytes
    amount_fen: int
    request_id: bytes
    online_ctc: int

    def _body(self) -> bytes:
        return (
            MAGIC
            + bytes((VERSION, self.kind))
            + self.serial
            + self.amount_fen.to_bytes(4, "big")
            + self.request_id
            + self.online_ctc.to_bytes(2, "big")
        )

    def encode(self, algorithm: Algorithm, dlk: bytes) -> bytes:
        """The card's side: the request with its MAC."""
        if len(self.serial) != 10 or len(self.request_id) != 4:
            raise ValueError("serial is 10 bytes, request id 4")
        if not 0 <= self.amount_fen <= request_amount_fen_max:
            raise ValueError("amount does not fit 4 bytes")
        body = self._body()
        return body + _mac(algorithm, dlk, self.request_id, self.online_ctc, body)


def is_service_request(user_data: bytes) -> bool:
    return user_data[:4] == MAGIC


def peek_serial(user_data: bytes) -> bytes:
    """The serial the request claims — to find the key that checks it."""
    if len(user_data) != request_bytes or not is_service_request(user_data):
        raise RequestInvalid(f"a service request is {request_bytes} bytes starting BUSR")
    return user_data[6:16]


def decode_and_verify(user_data: bytes, algorithm: Algorithm, dlk: bytes) -> ServiceRequest:
    """The platform's side: parse, then check the MAC (constant time)."""
    serial = peek_serial(user_data)
    if user_data[4] != VERSION:
        raise RequestInvalid(f"service request version {user_data[4]} is not {VERSION}")
    try:
        kind = RequestKind(user_data[5])
    except ValueError:
        raise RequestInvalid(f"unknown service request kind {user_data[5]}") from None
    request = ServiceRequest(
        kind,
        serial,
        int.from_bytes(user_data[16:20], "big"),
        user_data[20:24],
        int.from_bytes(user_data[24:26], "big"),
    )
    body, mac = user_data[:-mac_bytes], user_data[-mac_bytes:]
    expected = _mac(algorithm, dlk, request.request_id, request.online_ctc, body)
    if not hmac.compare_digest(mac, expected):
        raise RequestInvalid("the request's MAC does not verify: not this card")
    return request


def _mac(algorithm: Algorithm, dlk: bytes, request_id: bytes, ctc: int, body: bytes) -> bytes:
    session_key = load_session_key(algorithm, dlk, request_id, ctc)
    return cbc_mac(algorithm, session_key, body)[:mac_bytes]
