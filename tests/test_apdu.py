"""ISO/IEC 7816-4 short APDUs at the card's door: the parser's round trip, the malformed
vectors of tests/vectors/malformed_apdus.json, and a property over any bytes at all."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim_applet.apdu import SW, ApduError, CommandApdu, parse_command, response, split_response
from sim_applet.sim import Sim
from sim_applet.structures import (
    GET_BALANCE,
    GET_CHALLENGE,
    InitializeRequest,
    initialize_for_load,
    initialize_for_purchase,
    verify_pin,
)
from tests.card_helpers import (
    PIN,
    POS_TERMINAL_ID,
    hex_bytes,
    load_vectors,
    new_sim,
    ok,
    snapshot,
)

MALFORMED = load_vectors("malformed_apdus.json")["cases"]

# --- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "apdu",
    [
        CommandApdu(0x80, 0x5C, 0x00, 0x02),  # case 1
        CommandApdu(0x80, 0x5C, 0x00, 0x02, le=4),  # case 2
        CommandApdu(0x00, 0xB0, 0x95, 0x00, le=256),  # case 2, Le 00
        CommandApdu(0x00, 0x20, 0x00, 0x00, PIN),  # case 3
        CommandApdu(0x80, 0x50, 0x01, 0x02, bytes(11), 0x0F),  # case 4
        CommandApdu(0x80, 0xDC, 0x01, 0xD0, bytes(255), 256),  # case 4, longest short APDU
    ],
    ids=["case1", "case2", "case2-le256", "case3", "case4", "case4-max"],
)
def test_parse_command_decodes_what_encode_wrote(apdu: CommandApdu) -> None:
    assert parse_command(apdu.encode()) == apdu


@given(
    header=st.binary(min_size=4, max_size=4),
    data=st.binary(max_size=255),
    le=st.none() | st.integers(1, 256),
)
def test_parse_encode_round_trip_for_every_short_apdu(
    header: bytes, data: bytes, le: int | None
) -> None:
    apdu = CommandApdu(header[0], header[1], header[2], header[3], data, le)
    assert parse_command(apdu.encode()) == apdu


@pytest.mark.parametrize(
    "raw",
    ["", "80", "805C00", "805C0002 0500", "805C0002 00 0B", "805C0002 03 0102"],
    ids=["empty", "1-byte", "3-byte", "lc-too-long", "lc-zero-extended", "lc-short-by-one"],
)
def test_parse_command_refuses_inconsistent_lengths_with_6700(raw: str) -> None:
    with pytest.raises(ApduError) as caught:
        parse_command(hex_bytes(raw))
    assert caught.value.sw == SW.WRONG_LENGTH


def test_response_appends_sw_and_split_response_takes_it_apart() -> None:
    raw = response(b"\x01\x02", SW.INSUFFICIENT_FUNDS)
    assert raw == bytes.fromhex("01029401")
    assert split_response(raw) == (b"\x01\x02", 0x9401)


def test_split_response_refuses_less_than_a_status_word() -> None:
    with pytest.raises(ValueError, match="too short"):
        split_response(b"\x90")


@pytest.mark.parametrize(("tries", "sw"), [(0, 0x63C0), (2, 0x63C2), (15, 0x63CF)])
def test_pin_tries_left_status_word(tries: int, sw: int) -> None:
    assert SW.pin_tries_left(tries) == sw


# --- malformed APDUs through the SIM (vectors) -----------------------------------------------


@pytest.mark.parametrize("case", MALFORMED, ids=[case["name"] for case in MALFORMED])
def test_malformed_apdu_answers_its_exact_status_word_and_changes_nothing(
    case: dict[str, Any],
) -> None:
    sim = new_sim()
    before = snapshot(sim)
    answer = sim.transmit(hex_bytes(case["apdu"]))
    assert answer.hex().upper() == case["sw"]
    assert snapshot(sim) == before
    assert ok(sim, GET_BALANCE)  # the card still answers


# --- any bytes at all (property) -------------------------------------------------------------

_KNOWN_HEADERS = [
    bytes.fromhex(h)
    for h in (
        "00A40400",
        "00A40000",
        "805C0002",
        "80500002",
        "80500102",
        "80500302",
        "80520000",
        "80540100",
        "80DC01D0",
        "805A0006",
        "805A0002",
        "00B09500",
        "00B09600",
        "00B201C4",
        "00B201D4",
        "00200000",
        "805E0100",
        "00840000",
        "841E0000",
        "84180000",
    )
]


def _framed(header: bytes, data: bytes, le: int | None) -> bytes:
    return CommandApdu(header[0], header[1], header[2], header[3], data, le).encode()


_commands = st.one_of(
    st.binary(max_size=40),
    st.builds(
        _framed,
        st.sampled_from(_KNOWN_HEADERS),
        st.binary(max_size=20),
        st.none() | st.integers(1, 256),
    ),
    st.builds(
        lambda header, tail: header + tail,
        st.sampled_from(_KNOWN_HEADERS),
        st.binary(max_size=20),
    ),
    st.sampled_from(
        [
            verify_pin(PIN).encode(),
            verify_pin(b"\x99\x99").encode(),
            GET_CHALLENGE.encode(),
            GET_BALANCE.encode(),
        ]
    ),
)


def _open_session(sim: Sim, session: str) -> None:
    request = InitializeRequest(1, 100, POS_TERMINAL_ID)
    if session == "purchase":
        ok(sim, initialize_for_purchase(request))
    elif session == "capp":
        ok(sim, initialize_for_purchase(request, capp=True))
    elif session == "load":
        ok(sim, initialize_for_load(request))
    elif session == "challenge":
        ok(sim, GET_CHALLENGE)
    elif session == "pin":
        ok(sim, verify_pin(PIN))
    elif session == "unselected":
        sim.reset()


def _changed_only_the_pin_tries(before: dict[str, Any], after: dict[str, Any]) -> bool:
    def without_tries(image: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {key: value for key, value in app.items() if key != "pin_tries_left"}
            for app in image["applications"]
        ]

    return without_tries(before) == without_tries(after)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    session=st.sampled_from(["idle", "purchase", "capp", "load", "challenge", "pin", "unselected"]),
    commands=st.lists(_commands, min_size=1, max_size=6),
)
def test_any_bytes_get_a_status_word_and_only_9000_changes_the_card(
    session: str, commands: list[bytes]
) -> None:
    sim = new_sim(balance_fen=500)
    _open_session(sim, session)
    for command in commands:
        before = snapshot(sim)
        answer = sim.transmit(command)  # must not raise
        assert len(answer) >= 2, f"{command.hex()} answered {answer.hex()!r}"
        sw = int.from_bytes(answer[-2:], "big")
        assert answer[-2] in (0x90, 0x62, 0x63, 0x67, 0x69, 0x6A, 0x6C, 0x6D, 0x6E, 0x93, 0x94)
        after = snapshot(sim)
        if after != before and sw != SW.OK:
            # The one exception the spec names: a wrong PIN spends a try (`63 Cx`).
            assert sw & 0xFFF0 == 0x63C0, f"{command.hex()} changed the card, SW {sw:04X}"
            assert _changed_only_the_pin_tries(before, after)
        assert sim.powered


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    session=st.sampled_from(["idle", "purchase", "capp", "load", "challenge", "pin"]),
    command=_commands,
    cut_after=st.integers(1, 8),
)
def test_with_a_cut_armed_the_answer_is_a_status_word_or_nothing_and_the_power_gone(
    session: str, command: bytes, cut_after: int
) -> None:
    sim = new_sim(balance_fen=500)
    _open_session(sim, session)
    sim.cut_power_after(cut_after)
    answer = sim.transmit(command)
    if answer == b"":
        assert not sim.powered
        assert sim.transmit(GET_BALANCE.encode()) == b""  # dead until powered on again
    else:
        assert len(answer) >= 2 and sim.powered
