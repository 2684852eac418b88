"""The card side of vsmartcard's vpcd: our SIM model "inserted" into a virtual PC/SC reader,
so pyscard, opensc-tool and scriptor see it as a physical card (notes: pcsc-stack.md).

Wire protocol (vpcd is the TCP server, we connect): every message both ways is a 2-byte
big-endian length and its payload. A 1-byte payload from vpcd is control: `00` power off,
`01` power on, `02` reset (no reply), `04` send the ATR. Anything longer is a C-APDU,
answered with response data ‖ SW. Closing the socket removes the card. When the model loses
power mid-command (a simulated tear) the connection is closed: the card left the field.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from reader_sim.link import Card

log = logging.getLogger(__name__)

VPCD_PORT_BASE = 35963  # 0x8C7B, slot 0; slot N listens on VPCD_PORT_BASE + N
frame_bytes_max = 0xFFFF
poll_interval_ms = 100
connect_timeout_s_default = 10.0
connect_retry_interval_s = 0.05

_POWER_OFF, _POWER_ON, _RESET, _GET_ATR = 0x00, 0x01, 0x02, 0x04


class VirtualCardServer:
    def __init__(
        self,
        card: Card,
        slot: int = 0,
        host: str = "127.0.0.1",
        on_apdu: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self.card = card
        self.address = (host, VPCD_PORT_BASE + slot)
        self.on_apdu = on_apdu
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- connection ----------------------------------------------------------------------

    def connect(self, timeout_s: float = connect_timeout_s_default) -> None:
        """Insert the card: connect to vpcd, retrying while nothing listens (pcscd still
        starting, or restarting) until ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_s = max(deadline - time.monotonic(), 0.001)
            try:
                connection = socket.create_connection(self.address, timeout=left_s)
                break
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(connect_retry_interval_s)
        connection.settimeout(timeout_s)  # (for what follows: as the socket had it before)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = connection

    def close(self) -> None:
        """Remove the card: closing the socket is what vpcd sees as removal."""
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def start_in_thread(self, timeout_s: float = connect_timeout_s_default) -> None:
        self.connect(timeout_s)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.serve_forever, args=(self._stop,), name="vpcd-card", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.close()

    # --- the loop --------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event) -> None:
        """Answer vpcd until ``stop`` is set, vpcd hangs up, or the card tears."""
        assert self._socket is not None, "connect() first"
        connection = self._socket
        try:
            while not stop.is_set():
                readable, _, _ = select.select([connection], [], [], poll_interval_ms / 1000)
                if not readable:
                    continue
                message = self._receive(connection)
                if message is None:
                    return  # vpcd closed the connection
                answer = self._answer(message)
                if answer is _REMOVED:
                    return
                if answer is not None:
                    connection.sendall(len(answer).to_bytes(2, "big") + answer)
        except OSError as error:
            if not stop.is_set():
                log.warning("vpcd connection ended: %s", error)
        finally:
            self.close()

    def _receive(self, connection: socket.socket) -> bytes | None:
        header = self._read_exactly(connection, 2)
        if header is None:
            return None
        length = int.from_bytes(header, "big")
        return self._read_exactly(connection, length) if length else b""

    @staticmethod
    def _read_exactly(connection: socket.socket, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            # vpcd writes the length and the payload in two send()s: with delayed ACK each
            # exchange would stall 40 ms. The kernel clears QUICKACK, so set it every time.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = connection.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _answer(self, message: bytes) -> bytes | object | None:
        if len(message) == 1:
            return self._control(message[0])
        if not message:
            return None
        answer = self.card.transmit(message)
        if not answer:  # the model lost power mid-command: the phone left the field
            return _REMOVED
        if self.on_apdu is not None:
            self.on_apdu(message, answer)
        return answer

    def _control(self, code: int) -> bytes | None:
        if code == _POWER_OFF:
            self.card.power_off()
        elif code == _POWER_ON:
            self.card.power_on()
        elif code == _RESET:
            self.card.reset()
        elif code == _GET_ATR:
            return self.card.atr
        else:
            log.warning("unknown vpcd control byte %02X", code)
        return None


_REMOVED = object()
