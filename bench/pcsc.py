"""PC/SC figures: GET BALANCE through pyscard → pcscd → vpcd → TCP → the card model, and a
whole reader session (connect, SELECT, GET BALANCE, disconnect)."""

from __future__ import annotations

import statistics
import time

from reader_sim.pcsc_link import PcscLink, card_present
from reader_sim.pcscd_process import PcscDaemon
from reader_sim.vpcd import VirtualCardServer
from sim_applet.personalize import demo_sim

SELECT = bytes.fromhex("00A4040008A00000063201010500")
GET_BALANCE = bytes.fromhex("805C000204")
presence_timeout_s = 10.0


def _wait(condition, timeout_s: float = presence_timeout_s) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the virtual reader did not change state")
        time.sleep(0.02)


def pcsc_figures(apdu_count: int = 1000, session_count: int = 100) -> dict[str, float]:
    with PcscDaemon():
        server = VirtualCardServer(demo_sim())
        server.start_in_thread()
        try:
            _wait(card_present)
            link = PcscLink.open()
            link.transmit(SELECT)
            apdu_us = []
            for _ in range(apdu_count):
                started = time.perf_counter()
                link.transmit(GET_BALANCE)
                apdu_us.append((time.perf_counter() - started) * 1e6)
            link.close()
            session_ms = []
            for _ in range(session_count):
                started = time.perf_counter()
                session = PcscLink.open()
                session.transmit(SELECT)
                session.transmit(GET_BALANCE)
                session.close()
                session_ms.append((time.perf_counter() - started) * 1e3)
        finally:
            server.stop()
            _wait(lambda: not card_present())
    apdu_us.sort()
    return {
        "pcsc_apdu_median_us": statistics.median(apdu_us),
        "pcsc_apdu_p99_us": apdu_us[int(len(apdu_us) * 0.99)],
        "pcsc_session_median_ms": statistics.median(session_ms),
    }


if __name__ == "__main__":
    for name, value in pcsc_figures().items():
        print(f"{name}: {value:.1f}")
