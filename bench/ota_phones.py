"""The phones of ``bench.ota``: a party of their own, in their own process, each phone a
greenlet (gevent), not a thread.

Each phone is the real ``reader_sim.phone.Phone`` with its own SIM image, its own kept-alive
connections to the SMS centre and to the bank, and the same blocking calls as in the CLI;
gevent's patched sockets make those calls switch phones instead of threads. As threads of
one process, 512 phones paid for the GIL: every socket call released it and took it back
against the others — some 74 context switches a top-up (/proc's counts over a loaded run) —
and a burst of answers (one submit of the worker's wakes tens of polls at once) made it
worse. As greenlets, the phones' CPU per top-up fell to 1.7–2.2 ms from 2.3–2.8
(interleaved runs of ``bench.ota``).

Driven by ``bench.ota`` over stdin and stdout, one JSON object a line, until the end of
its input (``--parent PID``: it ends with that process, too):
  ← {"phones": [[number, image path], ...], "smsc": url, "bank": url, "bank_card": "..."}
  → {"ready": n}
  ← {"alone": [warm-up top-ups, top-ups]}    → {"first": [ms, ...], "alone": [ms, ...]}
  ← {"loaded": top-ups a phone}              → {"latencies": [ms, ...], "elapsed_s": s}
A top-up that fails, or a line that is not a command, ends the process with its error on
stderr.
"""

from __future__ import annotations

import json
import sys
import time

confirmation_wait_s = 30
# A phone's long poll. Long, as a waiting phone's is: a proof of receipt rides the poll that
# waits for the next packet, and a poll that ends first costs one more (with 1 s, under
# load: 5.1 polls a top-up against 4.1).
poll_wait_ms = 10_000
MERCHANT = "BUSCARD"


def main() -> None:
    # Before anything imports socket, ssl, threading or time's sleep: patched afterwards,
    # they would block the whole process. (Here, not at import: importing this module
    # patches nothing.)
    from gevent import monkey

    monkey.patch_all()
    from wallet_service.http_server import end_with

    if sys.argv[1:2] == ["--parent"]:  # (the bench killed outright: these end too)
        end_with(int(sys.argv[2]))
    _serve(sys.stdin, sys.stdout)


def _serve(commands, answers) -> None:  # type: ignore[no-untyped-def]
    setup = json.loads(commands.readline())
    handsets = _phones(setup)
    _say(answers, {"ready": len(handsets)})
    for line in commands:
        command = json.loads(line)
        if "alone" in command:
            warm_up, measured = command["alone"]
            first = [handsets[0].top_up() for _ in range(warm_up)]
            _say(
                answers, {"first": first, "alone": [handsets[0].top_up() for _ in range(measured)]}
            )
        elif "loaded" in command:
            _say(answers, _all_at_once(handsets, command["loaded"]))
        else:
            raise SystemExit(f"bench.ota_phones: not a command: {line.strip()}")


def _say(answers, message: dict) -> None:  # type: ignore[no-untyped-def]
    answers.write(json.dumps(message) + "\n")
    answers.flush()


def _phones(setup: dict) -> list:  # type: ignore[type-arg]
    from sim_applet.sim import Sim

    return [
        BenchPhone(Sim.load(image), number, setup["smsc"], setup["bank"], setup["bank_card"])
        for number, image in setup["phones"]
    ]


def _all_at_once(handsets: list, topups_per_phone: int) -> dict:  # type: ignore[type-arg]
    import gevent

    started = time.perf_counter()
    jobs = [gevent.spawn(_top_ups, phone, topups_per_phone) for phone in handsets]
    gevent.joinall(jobs, raise_error=True)
    elapsed = time.perf_counter() - started
    return {"latencies": [ms for job in jobs for ms in job.value], "elapsed_s": elapsed}


def _top_ups(phone: BenchPhone, count: int) -> list[float]:
    return [phone.top_up() for _ in range(count)]


class BenchPhone:
    def __init__(self, sim, number: str, smsc: str, bank: str, bank_card: str) -> None:  # type: ignore[no-untyped-def]
        from reader_sim.phone import Phone, ScriptedScreen
        from wallet_service.http_client import KeepAliveClient
        from wallet_service.sms_gateway import HttpGateway

        self.screen = ScriptedScreen()
        bank_app = KeepAliveClient(bank)  # cheaper per request than requests or urllib3

        def pay(merchant: str, order_id: str, amount_fen: int) -> None:
            payment = {
                "merchant": merchant,
                "order_id": order_id,
                "amount_fen": amount_fen,
                "card_number": bank_card,
            }
            # (a kept-alive connection closed as reused is tried again: the bank pays an
            # order once, so asking twice is safe)
            answer = bank_app.request("POST", "/api/payments", json=payment, timeout_s=10)
            if answer.status >= 300:
                raise RuntimeError(f"the bank refused the payment: HTTP {answer.status}")

        self.phone = Phone(sim, number, HttpGateway(smsc, number), self.screen, pay)
        self.phone.power_on()

    def top_up(self) -> float:
        """One top-up of 1 yuan; its latency in ms."""
        read = len(self.phone.inbox)  # (the texts before this top-up's: not looked at again)
        started = time.perf_counter()
        self.screen.answers[:] = ["1", "123456"]
        self.phone.select(4)
        deadline = time.monotonic() + confirmation_wait_s
        while not self._confirmed(read):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no confirmation for {self.phone.number}")
            read = len(self.phone.inbox)
            self.phone.receive(wait_ms=poll_wait_ms)
        return (time.perf_counter() - started) * 1000

    def _confirmed(self, read: int) -> bool:
        """Whether a text after the first ``read`` confirms a top-up. (The harness's own
        CPU counts as the phones': rereading the whole inbox at every poll grew with it.)"""
        return any("Top-up OK" in text for text in self.phone.inbox[read:])


if __name__ == "__main__":
    main()
