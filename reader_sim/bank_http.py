"""``python app.py bank serve``: the simulated bank over HTTP, with its webhook sender,
served by granian (``wallet_service.http_server``). One worker process holds the bank and
its sender thread. Against cheroot, which served it before: 0.74–0.80 ms of the bank's CPU
a payment against 0.87–0.95 (8 kept-alive clients, 3,000 payments a run, three interleaved
pairs; a throwaway script reading the process tree's CPU from /proc).

A payment — every top-up's, the one hot request — is answered in plain WSGI, ahead of
Flask (``_PaymentsFirst``): Flask's request and response objects, its URL matching and
``jsonify`` cost more than the payment itself (in process, 2,000 payments a round: 0.53
against 0.22–0.25 ms of CPU). The other routes, rare, stay Flask's.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import date
from typing import Any

from flask import Flask, Response, jsonify, request

from reader_sim.bank import Bank, BankRefused, deliver_due, request_signed
from wallet_service.http_client import KeepAliveClient, origin_and_target
from wallet_service.http_server import BodyRefused, json_answer, request_body
from wallet_service.http_server import serve as serve_wsgi

sender_interval_s = 0.2
# Webhooks posted at once. One at a time, py-spy (wall time, bench.ota at ~140 top-ups/s)
# found the sender busy 96 % of the time, three quarters of it waiting for the platform's
# answers: near its limit, which a faster platform would have met before 200 a second.
deliveries_at_once = 8
server_threads = 128  # requests at once (every phone's payment)
delivery_timeout_s = 5.0
merchant_origins_kept_max = 64  # connections kept alive to this many callback origins
log = logging.getLogger(__name__)


def create_bank_app(
    bank: Bank, secret: str, webhooks_waiting: Callable[[], None] = lambda: None
) -> Flask:
    """``webhooks_waiting`` is told when a payment or refund queued a webhook."""
    app = Flask("bank")

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BankRefused("invalid_body", "send a JSON object")
        return data

    def from_the_merchant(payload: bytes) -> None:
        """Refunds and statements are the merchant's: its requests come signed with the
        secret it shares with the bank (``signed_request_headers``)."""
        if not request_signed(secret, payload, dict(request.headers)):
            raise _NotSigned

    @app.errorhandler(_NotSigned)
    def not_signed(_: _NotSigned) -> Response:
        message = "sign the request with the merchant's secret (webhook-id, -timestamp, -signature)"
        response = jsonify({"error": {"code": "unauthenticated", "message": message}})
        response.status_code = 401
        return response

    @app.errorhandler(BankRefused)
    @app.errorhandler(KeyError)
    @app.errorhandler(TypeError)
    @app.errorhandler(ValueError)
    def refused(error: Exception) -> Response:
        status, answer = _refusal(error)
        response = jsonify(answer)
        response.status_code = status
        return response

    @app.post("/api/cards")
    def open_card():  # type: ignore[no-untyped-def]
        data = body()
        bank.open_card(str(data["number"]), str(data["holder"]), int(data["balance_fen"]))
        return jsonify({"number": data["number"], "balance_fen": int(data["balance_fen"])}), 201

    @app.post("/api/merchants")
    def add_merchant():  # type: ignore[no-untyped-def]
        data = body()
        bank.add_merchant(str(data["id"]), str(data["callback_url"]))
        return jsonify({"id": data["id"]}), 201

    @app.post("/api/refunds")
    def refund():  # type: ignore[no-untyped-def]
        from_the_merchant(request.get_data())
        data = body()
        refund_id = bank.refund(
            str(data["payment_id"]),
            int(data["amount_fen"]),
            str(data.get("reason", "")),
            str(data["refund_key"]),
        )
        webhooks_waiting()
        return jsonify({"refund_id": refund_id}), 201

    @app.get("/api/statements/<merchant>/<day>.csv")
    def statement(merchant: str, day: str):  # type: ignore[no-untyped-def]
        from_the_merchant(request.full_path.rstrip("?").encode())
        return Response(bank.statement(merchant, date.fromisoformat(day)), mimetype="text/csv")

    @app.get("/api/webhooks")
    def webhooks():  # type: ignore[no-untyped-def]
        return jsonify(bank.webhook_log())

    app.wsgi_app = _PaymentsFirst(app.wsgi_app, bank, webhooks_waiting)  # type: ignore[method-assign]
    return app


PAYMENTS_PATH = "/api/payments"
payment_body_bytes_max = 4096  # four short fields
_PAYMENT_FIELDS = {"merchant": str, "order_id": str, "amount_fen": int, "card_number": str}


def _refusal(error: Exception) -> tuple[int, dict[str, Any]]:
    """The status and body of a refused request: the bank's no, or a malformed field."""
    if isinstance(error, BankRefused):
        status = 409 if error.code == "order_conflict" else 422
        return status, _error(error.code, str(error))
    return 422, _error("invalid_body", f"bad field: {error}")


class _PaymentsFirst:
    """``POST /api/payments`` in plain WSGI; any other request, Flask's app (``inner``)."""

    def __init__(self, inner: Callable, bank: Bank, webhooks_waiting: Callable[[], None]) -> None:
        self.inner, self.bank, self.webhooks_waiting = inner, bank, webhooks_waiting

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        if environ.get("PATH_INFO") != PAYMENTS_PATH:
            return self.inner(environ, start_response)
        if environ["REQUEST_METHOD"] != "POST":
            answer = json.dumps(_error("method_not_allowed", "POST only")).encode()
            return json_answer(start_response, 405, answer, {"Allow": "POST"})
        try:
            status, answer = 201, self._pay(environ)
        except (BankRefused, KeyError, TypeError, ValueError) as error:
            status, answer = _refusal(error)
        return json_answer(start_response, status, json.dumps(answer).encode())

    def _pay(self, environ: dict) -> dict[str, Any]:
        data = _payment_fields(environ)
        payment = self.bank.pay(
            data["merchant"], data["order_id"], data["amount_fen"], data["card_number"]
        )
        self.webhooks_waiting()
        return {**payment.__dict__, "paid_at": payment.paid_at.isoformat()}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _payment_fields(environ: dict) -> dict[str, Any]:
    """The payment's four fields, each of its type (BankRefused or ValueError if not)."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    said_json = mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )
    try:
        data = json.loads(request_body(environ, payment_body_bytes_max)) if said_json else None
    except BodyRefused as refused:
        raise BankRefused("invalid_body", str(refused)) from None
    except ValueError:  # (UnicodeDecodeError too)
        data = None
    if not isinstance(data, dict):
        raise BankRefused("invalid_body", "send a JSON object")
    for name, kind in _PAYMENT_FIELDS.items():
        value = data.get(name)
        if type(value) is not kind:  # (not a bool for an int; nothing converted)
            raise ValueError(f"{name} is a {'whole number' if kind is int else 'string'}")
    return data


class _NotSigned(Exception):
    pass


class PostingThreads:
    """``map`` on ``count`` daemon threads, started at its first use. Not a
    ThreadPoolExecutor: its threads are joined as the process exits, after every post still
    queued — a bank stopped in a pass of slow posts outlived granian's kill timeout. These
    end with the process; a post cut short is retried (the platform dedupes by webhook-id).
    ``attempt`` must not raise (``deliver_due``'s does not)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._started = threading.Lock()
        self._threads: list[threading.Thread] = []

    def map(self, attempt: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        self._start()
        results: list[Any] = [None] * len(items)
        done = threading.Semaphore(0)
        for index, item in enumerate(items):
            self._tasks.put((attempt, item, results, index, done))
        for _ in items:
            done.acquire()
        return results

    def _start(self) -> None:
        with self._started:
            while len(self._threads) < self.count:
                name = f"webhook-post-{len(self._threads)}"
                thread = threading.Thread(target=self._serve, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _serve(self) -> None:
        while True:
            attempt, item, results, index, done = self._tasks.get()
            try:
                results[index] = attempt(item)
            except Exception:  # (left None; the thread lives on for the next pass)
                log.exception("webhook sender: a post failed")
            finally:
                done.release()


class WebhookSender:
    """The bank's sender thread: it delivers what is due when woken (a new payment) and
    every ``sender_interval_s`` (retries). An unexpected error ends one pass, logged, never
    the thread."""

    def __init__(self, bank: Bank, secret: str) -> None:
        self.bank, self.secret = bank, secret
        self.stop, self.woken = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._posting = PostingThreads(deliveries_at_once)
        self._clients: dict[str, KeepAliveClient] = {}  # origin → its kept-alive connections
        self._clients_lock = threading.Lock()

    def wake(self) -> None:
        self.woken.set()

    def _post(self, url: str, payload: str, headers: dict[str, str]) -> int | None:
        """The callback's HTTP status; None when it could not be delivered (a merchant URL
        that is not http(s) too: retried, as an unreachable one, until its attempts run
        out). Redirects are not followed: a 3xx is an answer that is not a 2xx."""
        try:
            origin, target = origin_and_target(url)  # (ValueError: a broken IPv6 literal)
            answer = self._client(origin).request(
                "POST", target, body=payload.encode(), headers=headers, timeout_s=delivery_timeout_s
            )
        except (OSError, ValueError):
            return None
        return answer.status

    def _client(self, origin: str) -> KeepAliveClient:
        """(Shared by the posting threads: one client, one pool of connections an origin.)"""
        with self._clients_lock:
            if origin not in self._clients:
                if len(self._clients) >= merchant_origins_kept_max:
                    self._forget_clients()
                self._clients[origin] = KeepAliveClient(origin)
            return self._clients[origin]

    def _forget_clients(self) -> None:
        for client in self._clients.values():
            client.close()  # (a request on one meanwhile fails: retried, as unreachable)
        self._clients.clear()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.woken.wait(sender_interval_s)
            self.woken.clear()
            if self.stop.is_set():
                return
            try:
                deliver_due(self.bank, self.secret, self._post, self._posting.map)
            except Exception as error:  # the sender outlives any one pass: due webhooks
                # stay due, and the next pass (woken, or in sender_interval_s) retries them
                log.exception("webhook sender: a delivery pass failed: %s", error)


def serve_bank(
    host: str, port: int, db_path: str, secret: str, on_listening: Callable[[str], object]
) -> None:
    """Serve the bank in ``db_path`` until SIGTERM, SIGINT or SIGHUP, its sender delivering
    webhooks signed with ``secret``. CannotListen: the address is taken or not ours."""
    serve_wsgi(
        _load_app,
        {"db_path": db_path, "secret": secret},
        host=host,
        port=port,
        on_listening=lambda url: on_listening(f"bank on {url}"),
        threads=server_threads,
    )


def _load_app(settings: dict[str, Any]) -> Flask:
    """(In granian's worker process.) The bank and its sender thread, which ends with the
    worker: a delivery cut short is retried (the platform dedupes by webhook-id)."""
    bank = Bank(settings["db_path"])
    sender = WebhookSender(bank, settings["secret"])
    sender.thread.start()
    return create_bank_app(bank, settings["secret"], sender.wake)
