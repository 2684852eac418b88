"""``python app.py worker``: the loop that moves top-up orders — bank callbacks applied,
PoRs read from the SMS gateway, due steps done. Each unit of work is its own transaction,
so a worker killed anywhere leaves nothing the next one does not finish; several workers
share the queue (orders are claimed with SKIP LOCKED)."""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from urllib.parse import quote

import requests
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from reader_sim.bank import signed_request_headers
from reader_sim.smsc import Sms
from wallet_service import ota_channel
from wallet_service.db import the_database_failed
from wallet_service.models import TopUpOrder
from wallet_service.ota_channel import Outbox, SmsOtaChannel, handle_incoming_sms, keyset_lookup
from wallet_service.services import rekeys, topups
from wallet_service.services.registry import Context
from wallet_service.sms_gateway import SmsGateway

log = logging.getLogger(__name__)
steps_per_pass_max = 1_000
poll_wait_ms = 500
sms_lease_ms = 30_000  # an SMS not acknowledged within this comes again
retry_wait_s = 1.0
notify_wait_s = 1.0
idle_poll_ms_default = 20  # how soon a stored bank callback becomes packet 1 (no NOTIFY)
idle_poll_ms_listening = 250  # with LISTEN/NOTIFY a callback wakes the loop; timeouts are slow
request_timeout_s = 10.0
statement_timeout_s = 30.0  # a day's statement: larger than a refund's answer
BANK_KINDS = ("refunds", "unknown_payments")  # steps that ask the bank
RARE_KINDS = ("refunds", "unknown_payments", "rekeys")  # due work looked for in one query,
rare_work_look_s = 1.0  # at most this often (not after every batch: under load, a pass
# runs for every callback stored; these steps wait seconds to minutes anyway)


# Timeout, too early, too many requests, unavailable: ask again later, when the answer's
# Retry-After says if it does.
BUSY_STATUSES = (408, 425, 429, 503)


SIGNATURE_REFUSED = (
    "the bank refused the request's signature: check WALLET_BANK_WEBHOOK_SECRET against "
    "the bank's, and both machines' clocks (5 minutes' tolerance)"
)


class HttpBankClient:
    """Refunds through the (simulated) bank's API; idempotent by refund key. A 4xx answer
    is the bank's no (``topups.RefundRefused``). Requests are signed with the secret the
    platform shares with the bank (``secret``: its callbacks' too), as the bank wants."""

    def __init__(self, base_url: str, secret: str | None) -> None:
        self.base_url, self.secret = base_url.rstrip("/"), secret

    def _signed(self, payload: str) -> dict[str, str]:
        if not self.secret:
            raise NoBankSecret(
                "the bank takes signed requests only: set WALLET_BANK_WEBHOOK_SECRET"
            )
        return signed_request_headers(self.secret, payload, datetime.now())

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str:
        body = json.dumps(
            {
                "payment_id": payment_id,
                "amount_fen": amount_fen,
                "reason": reason,
                "refund_key": refund_key,
            }
        )
        try:
            headers = self._signed(body)
        except NoBankSecret as missing:  # (the refund waits: the setting may yet come)
            raise topups.BankBusy(str(missing), None) from None
        answer = requests.post(
            f"{self.base_url}/api/refunds",
            data=body.encode(),
            headers=headers,
            timeout=request_timeout_s,
        )
        if answer.status_code in BUSY_STATUSES:
            retry_after = retry_after_s(answer.headers.get("Retry-After"), time.time())
            raise topups.BankBusy(f"HTTP {answer.status_code}", retry_after)
        if answer.status_code == 401:  # not the bank's no: the platform's set-up (asked again)
            raise topups.BankBusy(SIGNATURE_REFUSED, None)
        if 400 <= answer.status_code < 500:  # the bank said no: asking again will not help
            raise topups.RefundRefused(f"HTTP {answer.status_code}: {answer.text[:200]}")
        answer.raise_for_status()  # a server error: asked again later
        return answer.json()["refund_id"]

    def statement(self, merchant: str, day: date) -> str:
        """The bank's statement of ``merchant``'s payments and refunds on ``day`` (CSV)."""
        target = f"/api/statements/{merchant}/{day}.csv"  # (signed as the bank reads it)
        sent = f"/api/statements/{quote(merchant, safe='')}/{day}.csv"
        answer = requests.get(
            self.base_url + sent, headers=self._signed(target), timeout=statement_timeout_s
        )
        if answer.status_code == 401:
            raise requests.HTTPError(SIGNATURE_REFUSED, response=answer)
        answer.raise_for_status()
        return answer.text


class NoBankSecret(ValueError):
    """No secret to sign the bank's requests with."""


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """An answer's Retry-After (RFC 9110 §10.2.3: delay-seconds, or an HTTP-date) as
    seconds from ``now_s`` (Unix time); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # (str.isdigit takes "²" too)
        return float(value)
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:  # an HTTP-date is in GMT; one without a zone is not one
        return None
    return max(0.0, at.timestamp() - now_s)


@dataclass
class PassReport:
    bank_events: int = 0
    sms: int = 0
    steps: int = 0


class Worker:
    """One worker's units of work, each its own transaction; packets leave after commit."""

    def __init__(self, app: Flask, gateway: SmsGateway, bank: topups.BankClient) -> None:
        self.app, self.gateway, self.bank = app, gateway, bank
        self.database = app.extensions["database"]
        self.woken = threading.Event()  # set by LISTEN/NOTIFY: work was stored
        self.rare_work_look_s = rare_work_look_s  # (a benchmark looks on every pass)
        self.rare_work_looked_at = -rare_work_look_s  # (time.monotonic)
        self.unacknowledged: list[int] = []  # SMS handled, acknowledged with the next receive

    def _in_transaction(self, work):  # type: ignore[no-untyped-def]
        return self.database.run(
            lambda session: work(Context.for_platform(session, self.app.config))
        )

    def _channel(self, ctx: Context) -> SmsOtaChannel:
        return SmsOtaChannel(self.gateway, keyset_lookup(ctx, ctx.keys.ota_masters()))

    def _committed_then_sent(self, work):  # type: ignore[no-untyped-def]
        return ota_channel.committed_then_sent(self._in_transaction, self._channel, work)

    def apply_bank_events(self) -> int:
        return self._in_transaction(lambda ctx: topups.process_bank_events(ctx))

    def read_sms(self, wait_ms: int = 0, acknowledge_now: bool = True) -> int:
        """PoRs and requests from phones (waiting up to ``wait_ms`` for the first): all
        that came, in one transaction. Sorted by sender, so two workers lock the same
        orders in the same order. A message that fails — a bug, data the database refuses
        — is logged and dropped with its packets, and the others stand: the batch is done
        again with a savepoint per message (savepoints cost two statements a message, so
        only a failed batch pays for them). Messages come leased and are acknowledged
        once their batch has committed and its packets are out: a worker that dies, a
        database outage, an SMS centre down for the packets — the SMS centre delivers them
        again after ``sms_lease_ms`` (handling one twice changes nothing: a PoR is then
        stale, a request finds its order and sends its payment link again). Without
        ``acknowledge_now`` (the worker's own loop) they are acknowledged in the next
        receive: one request a batch, not two."""
        received = self.gateway.receive(wait_ms, sms_lease_ms, self.unacknowledged)
        self.unacknowledged = []
        messages = sorted(received, key=lambda sms: (sms.sender, sms.id))
        if not messages:
            return 0
        merchant = self.app.config["BANK_MERCHANT"]

        def all_at_once(ctx: Context, box: Outbox) -> list[str]:
            try:
                ota_channel.read_ahead(ctx, box, messages)
                return [handle_incoming_sms(ctx, box, sms, merchant) for sms in messages]
            except (OperationalError, IntegrityError):
                raise  # races: retried by Database.run; an outage: delivered again later
            except Exception as error:  # one of the messages (not the sending after commit)
                raise _BatchFailed from error

        try:
            outcomes = self._committed_then_sent(all_at_once)
        except (_BatchFailed, IntegrityError) as failed:  # (a conflict that outlived retries)
            log.warning(
                "an SMS batch failed; again, one savepoint per message: %r",
                failed.__cause__ or failed,
            )
            outcomes = self._committed_then_sent(
                lambda ctx, box: [_handle_one(ctx, box, sms, merchant) for sms in messages]
            )
        handled = [sms.id for sms in messages]  # committed, packets out
        if acknowledge_now:
            self.gateway.acknowledge(handled)
        else:
            self.unacknowledged = handled
        for sms, outcome in zip(messages, outcomes, strict=True):
            log.info("SMS from %s: %s", sms.sender, outcome)
        return len(messages)

    def do_due_work(self) -> int:
        """Bank callbacks applied and due packets sent, one transaction per batch; then
        refunds and rekey steps, when a look (at most one a ``rare_work_look_s``) saw any
        due."""
        done, rare_kinds = 0, set()
        for _ in range(steps_per_pass_max):
            look = time.monotonic() - self.rare_work_looked_at >= self.rare_work_look_s
            events, steps, due = self._committed_then_sent(
                lambda ctx, box, look=look: self._callbacks_and_packets(ctx, box, look)
            )
            if look:  # (once committed: a transaction retried or failed looks again)
                self.rare_work_looked_at = time.monotonic()
            done, rare_kinds = done + events + steps, rare_kinds | due
            if events < topups.events_per_batch and steps < topups.orders_per_batch:
                break
        return done + self.do_due_steps(rare_kinds)

    def _callbacks_and_packets(
        self, ctx: Context, box: Outbox, look: bool
    ) -> tuple[int, int, set[str]]:
        paid: list[TopUpOrder] = []  # (written once, with their packet 1)
        events = topups.process_bank_events(ctx, paid=paid)
        steps = len(topups.work_batch(ctx, box, self.bank, paid=paid))
        if not look:
            return events, steps, set()
        due = ctx.session.execute(
            select(
                topups.refunds_due(ctx), topups.unknown_payments_due(ctx), rekeys.anything_due(ctx)
            )
        ).one()
        return events, steps, {kind for kind, is_due in zip(RARE_KINDS, due, strict=True) if is_due}

    def do_due_steps(self, kinds: set[str] | None = None) -> int:
        """Packet-sending steps in batches; refunds, refunds of payments for unknown orders
        and rekey steps one at a time."""
        kinds = {"orders", *RARE_KINDS} if kinds is None else kinds
        done = 0
        if "orders" in kinds:
            for _ in range(steps_per_pass_max):
                batch = self._committed_then_sent(
                    lambda ctx, box: topups.work_batch(ctx, box, self.bank)
                )
                done += len(batch)
                if len(batch) < topups.orders_per_batch:
                    break
        bank_down = False
        for kind, step in (
            ("refunds", lambda ctx, box: topups.refund_once(ctx, box, self.bank)),
            (
                "unknown_payments",
                lambda ctx, box: topups.refund_unknown_payment_once(ctx, self.bank),
            ),
            ("rekeys", lambda ctx, box: rekeys.work_once(ctx, box)),
        ):
            if kind not in kinds or (bank_down and kind in BANK_KINDS):
                continue
            for _ in range(steps_per_pass_max):
                result = self._committed_then_sent(step)
                if result is None:
                    break
                done += 1
                outcome = result.action if isinstance(result, topups.WorkResult) else result
                if outcome == topups.BANK_NOT_ASKED:
                    bank_down = True  # one timeout a pass, not one a refund due
                    break
        return done


class _BatchFailed(Exception):
    """A message of an SMS batch failed inside the transaction (rolled back)."""


def _handle_one(ctx: Context, box: Outbox, sms: Sms, merchant: str) -> str:
    mark = box.mark()
    try:
        with ctx.session.begin_nested():
            return handle_incoming_sms(ctx, box, sms, merchant)
    except Exception as error:
        if the_database_failed(error):
            raise  # a deadlock: the whole batch again (Database.run); else not acknowledged
        # A bug, data the database refused, a conflict (a twin handled it elsewhere, or it
        # never can be): this message only — else, never acknowledged, it would come back
        # with each lease and take its batch down with it.
        box.discard_since(mark)
        log.exception("SMS from %s not handled", sms.sender)
        return "failed"


def run_once(
    app: Flask, gateway: SmsGateway, bank: topups.BankClient, wait_ms: int = 0
) -> PassReport:
    """One pass over everything (tests, ``worker --once``)."""
    worker = Worker(app, gateway, bank)
    report = PassReport(bank_events=worker.apply_bank_events())
    report.sms = worker.read_sms(wait_ms)
    report.steps = worker.do_due_steps()
    return report


def run_forever(
    app: Flask,
    gateway: SmsGateway,
    bank: topups.BankClient,
    stop: threading.Event,
    idle_poll_ms: int | None = None,
) -> None:
    """Two loops: SMS from phones (long-polled, answered at once) and the database's
    due work (bank callbacks, packets to send), polled every ``idle_poll_ms`` when idle
    (by default: 20 ms, or 250 ms where LISTEN/NOTIFY wakes it as a callback is stored)."""
    worker = Worker(app, gateway, bank)

    def sms_loop() -> None:
        _repeat(stop, lambda: worker.read_sms(poll_wait_ms, acknowledge_now=False), 0)
        try:
            worker.gateway.acknowledge(worker.unacknowledged)  # the last batch's
        except OSError as error:  # (delivered again when their lease ends: stale then)
            log.warning("SMS handled last not acknowledged: %s", error)

    reader = threading.Thread(target=sms_loop, name="sms", daemon=True)
    reader.start()
    listening = threading.Event()  # set while the LISTEN connection is up
    listener = _listen_for_work(app, worker.woken, stop, listening)
    if idle_poll_ms is None:
        idle_poll_ms = idle_poll_ms_default if listener is None else idle_poll_ms_listening
    _repeat(stop, worker.do_due_work, idle_poll_ms, worker.woken, listening)
    if listener is not None:
        listener.join(timeout=notify_wait_s * 2)
    reader.join(timeout=request_timeout_s + poll_wait_ms / 1000)


# libpq's TCP keepalives on the LISTEN connection: one whose peer vanished without a word
# (no RST) is found dead in some 20 s, not in the system's two hours — meanwhile the due
# loop would wait for NOTIFYs that cannot come (up to idle_poll_ms_listening a pass).
_LISTEN_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
}


def _listen_for_work(
    app: Flask, woken: threading.Event, stop: threading.Event, listening: threading.Event
) -> threading.Thread | None:
    """On PostgreSQL, a stored bank callback NOTIFYs: the database loop wakes at once
    instead of at its next poll. Polling stays as the fallback (a lost connection).
    ``listening`` is set while the LISTEN is in place."""
    import psycopg

    from wallet_service.services.bank_webhooks import WORK_CHANNEL

    url = app.extensions["database"].engine.url
    if url.get_backend_name() != "postgresql":
        return None
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)

    def listen() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, **_LISTEN_KEEPALIVES) as connection:
                    connection.execute(f"LISTEN {WORK_CHANNEL}")
                    listening.set()
                    try:
                        woken.set()  # (what was stored while no one listened: look now)
                        while not stop.is_set():
                            for _ in connection.notifies(timeout=notify_wait_s, stop_after=1):
                                woken.set()
                    finally:
                        listening.clear()  # (however it ends: the loop polls meanwhile)
            except psycopg.Error as error:
                log.warning("LISTEN failed, polling meanwhile: %s", error)
                stop.wait(retry_wait_s)

    thread = threading.Thread(target=listen, name="listen", daemon=True)
    thread.start()
    return thread


def _repeat(
    stop: threading.Event,
    unit: Callable[[], int],
    idle_ms: int,
    woken: threading.Event | None = None,
    listening: threading.Event | None = None,
) -> None:
    """``unit`` again and again: at once after a pass that did something, else after
    ``idle_ms`` or a wake-up. While ``listening`` (LISTEN/NOTIFY in place), a pass that did
    something is not followed by one at once either: ``unit`` works until its queue is
    empty (``do_due_work``), so what comes after is stored later — and wakes it. (Under
    load, that pass found nothing more than a third of the time.)"""
    while not stop.is_set():
        try:
            if woken is not None:
                woken.clear()  # before the pass: a wake-up during it means "look again"
            done = unit()
            drained = done == 0 or (listening is not None and listening.is_set())
            if drained and idle_ms:
                (woken or stop).wait(idle_ms / 1000)
        except (requests.RequestException, OSError) as error:
            log.warning("worker pass failed, retrying: %s", error)
            stop.wait(retry_wait_s)
        except Exception:  # a database outage, a bug in one unit: log it, keep the loop
            log.exception("worker unit failed; its transaction rolled back, retrying")
            stop.wait(retry_wait_s)
