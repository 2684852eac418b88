"""The test helpers' own behaviour, where a run depends on it."""

from __future__ import annotations

import socket
import threading

from tests.helpers import wait_until_up


def test_a_server_that_accepts_but_does_not_answer_is_not_up_yet() -> None:
    """A server still starting on a busy machine: its socket listens, no answer comes
    within the probe's second. Waiting goes on instead of failing the run."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(listening.accept()[0]), daemon=True).start()
        port = listening.getsockname()[1]
        assert wait_until_up(f"http://127.0.0.1:{port}/health", timeout_s=1.5) is False
        for connection in accepted:
            connection.close()
