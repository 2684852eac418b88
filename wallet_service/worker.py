"""``python app.py worker``: the loop that moves top-up orders — bank callbacks applied,
PoRs read from the SMS gateway, due steps done. Each unit of work is its own transaction,
so a worker killed anywhere leaves nothing the next one does not finish; several workers
share the queue (orders are claimed with SKIP LOCKED)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import requests
from flask import Flask

from wallet_service import ota_channel
from wallet_service.auth import Principal
from wallet_service.ota_channel import SmsOtaChannel, handle_incoming_sms, keyset_lookup
from wallet_service.services import topups
from wallet_service.services.registry import Context
from wallet_service.sms_gateway import SmsGateway

log = logging.getLogger(__name__)
steps_per_pass_max = 1_000
poll_wait_ms = 500
request_timeout_s = 10.0


class HttpBankClient:
    """Refunds through the (simulated) bank's API; idempotent by refund key."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str:
        answer = requests.post(
            f"{self.base_url}/api/refunds",
            json={
                "payment_id": payment_id,
                "amount_fen": amount_fen,
                "reason": reason,
                "refund_key": refund_key,
            },
            timeout=request_timeout_s,
        )
        answer.raise_for_status()
        return answer.json()["refund_id"]


@dataclass
class PassReport:
    bank_events: int = 0
    sms: int = 0
    steps: int = 0


def run_once(
    app: Flask, gateway: SmsGateway, bank: topups.BankClient, wait_ms: int = 0
) -> PassReport:
    database = app.extensions["database"]
    report = PassReport()

    def context(session) -> Context:  # type: ignore[no-untyped-def]
        return Context(
            session,
            Principal(0, "admin"),
            app.config["CLOCK"](),
            app.config["KEY_STORE"],
            Path(app.config["PERSONALIZATION_DIR"]),
        )

    def in_transaction(work):  # type: ignore[no-untyped-def]
        return database.run(lambda session: work(context(session)))

    def channel(ctx: Context) -> SmsOtaChannel:
        return SmsOtaChannel(gateway, keyset_lookup(ctx, ctx.keys.ota_masters()))

    def committed_then_sent(work):  # type: ignore[no-untyped-def]
        return ota_channel.committed_then_sent(in_transaction, channel, work)

    report.bank_events = database.run(
        lambda session: topups.process_bank_events(context(session), bank)
    )
    for sms in gateway.receive(wait_ms):
        report.sms += 1
        outcome = committed_then_sent(
            lambda ctx, box, sms=sms: handle_incoming_sms(
                ctx, box, sms, app.config["BANK_MERCHANT"]
            )
        )
        log.info("SMS from %s: %s", sms.sender, outcome)
    for _ in range(steps_per_pass_max):
        result = committed_then_sent(lambda ctx, box: topups.work_once(ctx, box, bank))
        if result is None:
            break
        report.steps += 1
    return report


def run_forever(
    app: Flask, gateway: SmsGateway, bank: topups.BankClient, stop: threading.Event
) -> None:
    while not stop.is_set():
        try:
            run_once(app, gateway, bank, wait_ms=poll_wait_ms)
        except (requests.RequestException, OSError) as error:
            log.warning("worker pass failed, retrying: %s", error)
            stop.wait(1.0)
