"""One door between a reader and a card: ``transmit(command) -> response``.

The reader code (POS, load terminal, scripts) only ever sees a ``Link``; what carries the
bytes is an adapter: in memory for tests and the demo, PC/SC through pyscard for real
readers (``reader_sim.pcsc_link``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sim_applet.apdu import CommandApdu


class CardRemoved(Exception):
    """The card left the field (phone taken away, power cut, reader emptied)."""


class Link(Protocol):
    def transmit(self, command: bytes) -> bytes:
        """Send one C-APDU, return response data followed by SW1 SW2.

        Raises CardRemoved when no card answers.
        """
        ...


class Card(Protocol):
    """What a link needs of a card model (``sim_applet.sim.Sim`` is one)."""

    atr: bytes

    def transmit(self, command: bytes) -> bytes: ...

    def power_on(self) -> bytes: ...

    def power_off(self) -> None: ...

    def reset(self) -> bytes: ...

    @property
    def powered(self) -> bool: ...


class InMemoryLink:
    """A reader wired straight to a card object, as h11's ConnectionPair wires two ends."""

    def __init__(self, card: Card) -> None:
        self.card = card
        self.card_present = True

    def transmit(self, command: bytes) -> bytes:
        if not self.card_present or not self.card.powered:
            raise CardRemoved("no card in the field")
        answer = self.card.transmit(command)
        if not answer:  # the card lost power mid-command: the phone left the field
            self.card_present = False
            raise CardRemoved("the card stopped answering")
        return answer

    def remove_card(self) -> None:
        self.card_present = False
        self.card.power_off()

    def present_card(self) -> None:
        self.card_present = True
        self.card.power_on()


def exchange(link: Link, command: CommandApdu) -> tuple[bytes, int]:
    """Send a command, return (response data, SW); CardRemoved when nothing usable came."""
    from sim_applet.apdu import split_response

    raw = link.transmit(command.encode())
    if len(raw) < 2:
        raise CardRemoved("no answer")
    return split_response(raw)
