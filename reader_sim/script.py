"""APDU scripts: what ``app.py card script`` runs.

One command per line, hex; ``#`` starts a comment. A line holds either
- the C-APDU alone, in one token or spaced bytes as scriptor writes it
  (``00 A4 04 00 08 A0 00 00 06 32 01 01 05 00``), or
- the C-APDU and the expected response (data ‖ SW) as two tokens, or separated by ``->``
  (``80 5C 00 02 04 -> 00 00 13 88 90 00``); ``XX`` in an expected response matches any
  byte (pseudo-random numbers, MACs).
The run stops at the first response that does not match.
"""

from __future__ import annotations

from dataclasses import dataclass

from reader_sim.link import Link

script_lines_max = 10_000


class ScriptError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    line: int
    command: bytes
    expected: str | None  # normalized upper-case hex, "XX" wildcards


@dataclass(frozen=True)
class StepResult:
    step: Step
    response: bytes

    @property
    def matches(self) -> bool:
        expected = self.step.expected
        if expected is None:
            return True
        actual = self.response.hex().upper()
        return len(actual) == len(expected) and all(
            e == "X" or e == a for e, a in zip(expected, actual, strict=True)
        )


def parse_script(text: str) -> list[Step]:
    steps = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if len(steps) >= script_lines_max:
            raise ScriptError(f"more than {script_lines_max} commands")
        steps.append(_parse_line(number, line))
    return steps


def _parse_line(number: int, line: str) -> Step:
    if "->" in line:
        command_text, expected_text = line.split("->", 1)
    else:
        tokens = line.split()
        if len(tokens) == 2:
            command_text, expected_text = tokens
        else:
            command_text, expected_text = line, None
    try:
        command = bytes.fromhex(command_text.replace(" ", ""))
    except ValueError:
        raise ScriptError(
            f"line {number}: the command is not hex: {command_text.strip()!r}"
        ) from None
    if len(command) < 4:
        raise ScriptError(f"line {number}: a C-APDU has at least 4 bytes")
    expected = None
    if expected_text is not None:
        expected = "".join(expected_text.split()).upper()
        if (
            len(expected) % 2
            or len(expected) < 4
            or any(c not in "0123456789ABCDEFX" for c in expected)
        ):
            raise ScriptError(f"line {number}: the expected response is not hex: {expected_text!r}")
    return Step(number, command, expected)


def run_script(link: Link, steps: list[Step]) -> list[StepResult]:
    """Run until the first mismatch; the last result is the mismatch if there is one."""
    results = []
    for step in steps:
        result = StepResult(step, link.transmit(step.command))
        results.append(result)
        if not result.matches:
            break
    return results
