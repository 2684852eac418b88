"""Atomic non-volatile memory and the power that can fail between any two steps.

A real e-purse writes balance, CTC and log record inside one EEPROM transaction: a phone
pulled away mid-command leaves the card untouched or fully updated (card-application.md
§5). Here every internal step of a command calls ``power.step()``; a test arms
``cut_after(n)`` to lose power right after the n-th step. Writes go to a ``Transaction``
and reach the state only at ``commit()``, which is a single step: before it nothing has
changed, after it everything has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PowerLost(Exception):
    """Internal to the card: the field vanished. Caught at the SIM's door, never beyond."""


@dataclass
class Power:
    steps_taken: int = 0
    cut_after_steps: int | None = None
    commits: int = 0  # how many times persistent state changed: tells a saver when to save

    def begin_command(self) -> None:
        self.steps_taken = 0

    def step(self) -> None:
        self.steps_taken += 1
        if self.cut_after_steps is not None and self.steps_taken >= self.cut_after_steps:
            self.cut_after_steps = None
            raise PowerLost


@dataclass
class Transaction:
    """Buffered writes to a state object; ``commit`` applies them all at once."""

    target: Any
    power: Power
    writes: dict[str, Any] = field(default_factory=dict)

    def write(self, name: str, value: Any) -> None:
        assert hasattr(self.target, name), name
        self.power.step()
        self.writes[name] = value

    def commit(self) -> None:
        self.power.step()  # power lost here: nothing written
        for name, value in self.writes.items():
            setattr(self.target, name, value)
        self.writes = {}
        self.power.commits += 1
        self.power.step()  # power lost here: all written, the answer never leaves
