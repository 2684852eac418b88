"""A ``Link`` over PC/SC through pyscard: the same reader code drives a physical card, or our
model inserted into a vpcd reader (reader_sim.vpcd)."""

from __future__ import annotations

import contextlib
import time

from reader_sim.link import CardRemoved

card_wait_timeout_s_default = 10.0


class PcscLink:
    def __init__(self, connection) -> None:  # type: ignore[no-untyped-def]
        self.connection = connection

    @classmethod
    def open(
        cls, reader_name: str = "Virtual PCD 00 00", timeout_s: float = card_wait_timeout_s_default
    ) -> PcscLink:
        """Wait for a card in the first reader whose name contains ``reader_name``; connect.
        After a removal, open a new link: reconnecting an old one fails (pcsc-stack.md)."""
        from smartcard.Exceptions import CardConnectionException, NoCardException
        from smartcard.System import readers

        deadline = time.monotonic() + timeout_s
        while True:
            matching = [r for r in readers() if reader_name in str(r)]
            if matching:
                connection = matching[0].createConnection()
                try:
                    connection.connect()
                    return cls(connection)
                except (NoCardException, CardConnectionException):
                    connection.release()
            if time.monotonic() > deadline:
                raise CardRemoved(f"no card in a reader named like {reader_name!r}")
            time.sleep(0.05)

    def transmit(self, command: bytes) -> bytes:
        from smartcard.Exceptions import CardConnectionException

        try:
            data, sw1, sw2 = self.connection.transmit(list(command))
        except CardConnectionException as error:
            raise CardRemoved(str(error)) from None
        return bytes(data) + bytes((sw1, sw2))

    @property
    def atr(self) -> bytes:
        return bytes(self.connection.getATR())

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a removed card cannot disconnect cleanly
            self.connection.disconnect()
        self.connection.release()


def card_present(reader_name: str = "Virtual PCD 00 00") -> bool:
    """What pcscd reports for the reader right now (SCardGetStatusChange, no connection)."""
    from smartcard import scard

    _, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        _, names = scard.SCardListReaders(context, [])
        matching = [name for name in names if reader_name in name]
        if not matching:
            return False
        _, states = scard.SCardGetStatusChange(
            context, 0, [(matching[0], scard.SCARD_STATE_UNAWARE)]
        )
        return bool(states[0][1] & scard.SCARD_STATE_PRESENT)
    finally:
        scard.SCardReleaseContext(context)
