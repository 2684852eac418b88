"""Fixtures for tests over the real PC/SC stack (pcscd + vpcd + pyscard).

One pcscd per test session (started here unless one runs already). Each test inserts its
card, waits until pcscd reports it present, and at the end removes it and waits until the
reader is empty — a leftover card would answer the next test (pcsc-stack.md, pitfall 2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from reader_sim.link import Card
from reader_sim.pcscd_process import PcscDaemon

presence_timeout_s = 10.0


def _require_pcsc(reason: str) -> None:
    if os.environ.get("REQUIRE_PCSC") == "1":
        pytest.fail(f"PC/SC required (REQUIRE_PCSC=1): {reason}")
    pytest.skip(f"PC/SC stack not available: {reason}")


@pytest.fixture(scope="session")
def pcsc_daemon() -> Iterator[PcscDaemon]:
    try:
        import smartcard  # noqa: F401
    except ImportError as error:
        _require_pcsc(f"pyscard not importable: {error}")
    from reader_sim.pcscd_process import PcscUnavailable

    daemon = PcscDaemon()
    try:
        daemon.start()
    except PcscUnavailable as error:
        _require_pcsc(str(error))
    yield daemon
    daemon.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = presence_timeout_s):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


@pytest.fixture
def insert_card(pcsc_daemon: PcscDaemon) -> Iterator[Callable[[Card], object]]:
    """``link = insert_card(sim)``: the card in vpcd slot 0, a PcscLink connected to it.

    The session's pcscd may be another program's, which can stop it at any time: each
    insertion first brings pcscd back if it has gone."""
    from reader_sim.pcsc_link import PcscLink, card_present
    from reader_sim.vpcd import VirtualCardServer

    inserted: list[tuple[VirtualCardServer, PcscLink]] = []

    def insert(card: Card) -> PcscLink:
        pcsc_daemon.start()
        wait_until(lambda: not card_present(), "the reader is empty before inserting")
        server = VirtualCardServer(card)
        server.start_in_thread()
        wait_until(card_present, "pcscd sees the card")
        link = PcscLink.open()
        inserted.append((server, link))
        return link

    yield insert  # type: ignore[misc]
    for server, link in inserted:
        link.close()
        server.stop()
    wait_until(lambda: not card_present(), "the reader is empty after the test")
