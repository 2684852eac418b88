"""ETSI TS 102 226 §5.1 compact remote APDUs: the command script is the C-APDUs one after
another; the response is number of commands executed (1) · SW of the last (2) · response
data of the last."""

from __future__ import annotations

from dataclasses import dataclass

commands_per_script_max = 16


def encode_script(apdus: list[bytes]) -> bytes:
    if not apdus:
        raise ValueError("a script holds at least one command")
    if len(apdus) > commands_per_script_max:
        raise ValueError(
            f"a script holds at most {commands_per_script_max} commands; these are {len(apdus)}"
        )
    return b"".join(apdus)


def decode_script(script: bytes) -> list[bytes]:
    """Split concatenated short C-APDUs (each's length from its own Lc/Le); ValueError when
    they do not add up."""
    apdus, offset = [], 0
    while offset < len(script):
        if len(apdus) == commands_per_script_max:
            raise ValueError(f"more than {commands_per_script_max} commands")
        length = _apdu_length(script[offset:])
        apdus.append(script[offset : offset + length])
        offset += length
    if not apdus:
        raise ValueError("an empty script")
    return apdus


# The compact format concatenates C-APDUs with nothing between them; a card knows each
# command's case from its INS (ISO 7816-4 §5.1), and so does this split. Project-defined:
# a scripted SELECT always carries Le (case 4).
_CASE_2 = {0x5C, 0xB0, 0xB2, 0x84, 0xCA}  # GET BALANCE, READ BINARY/RECORD, CHALLENGE, DATA
_CASE_3 = {0x20, 0x5E, 0xDC, 0x1E, 0x18}  # VERIFY, CHANGE PIN, UPDATE CAPP, BLOCK, UNBLOCK
_CASE_4 = {0xA4, 0x50, 0x52, 0x54, 0x5A, 0xD8}  # SELECT, INITIALIZE, CREDIT, DEBIT, PROVE, PUT KEY


def _apdu_length(rest: bytes) -> int:
    if len(rest) < 5:
        raise ValueError("a truncated command")
    ins, p3 = rest[1], rest[4]
    if ins in _CASE_2:
        length = 5
    elif ins in _CASE_3:
        length = 5 + p3
    elif ins in _CASE_4:
        length = 6 + p3
    else:
        raise ValueError(f"INS {ins:02X} cannot be sent in a script")
    if length > len(rest):
        raise ValueError("the command lengths do not add up")
    return length


@dataclass(frozen=True)
class CompactResponse:
    commands_executed: int
    last_sw: int
    last_data: bytes

    def encode(self) -> bytes:
        return bytes((self.commands_executed,)) + self.last_sw.to_bytes(2, "big") + self.last_data

    @classmethod
    def decode(cls, raw: bytes) -> CompactResponse:
        if len(raw) < 3:
            raise ValueError("a compact response is at least 3 bytes")
        return cls(raw[0], int.from_bytes(raw[1:3], "big"), raw[3:])

    @property
    def last_response(self) -> bytes:
        """The last R-APDU as a reader sees it: data ‖ SW."""
        return self.last_data + self.last_sw.to_bytes(2, "big")
