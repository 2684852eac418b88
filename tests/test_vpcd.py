"""The card side of vpcd, over plain sockets (no pcscd): inserting waits for vpcd to listen."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from reader_sim.vpcd import VPCD_PORT_BASE, VirtualCardServer
from tests.helpers import new_card
from tests.wallet_fixtures import _free_port


def _server_on(port: int) -> VirtualCardServer:
    return VirtualCardServer(new_card(), slot=port - VPCD_PORT_BASE)


def test_inserting_waits_for_vpcd_to_start_listening() -> None:
    port = _free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_late() -> None:
        time.sleep(0.3)  # pcscd still starting: connections are refused until now
        listener.bind(("127.0.0.1", port))
        listener.listen(1)

    late = threading.Thread(target=listen_late)
    late.start()
    server = _server_on(port)
    try:
        server.connect(timeout_s=5)
        accepted, _ = listener.accept()
        accepted.close()
    finally:
        server.close()
        late.join()
        listener.close()


def test_inserting_gives_up_when_nothing_listens_in_time() -> None:
    server = _server_on(_free_port())
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        server.connect(timeout_s=0.2)
    assert time.monotonic() - started >= 0.2
