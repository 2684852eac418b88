"""The bus POS's PSAM (card-application.md §4, reader_sim/psam.py): its MAC1 is what the
card expects, MAC2 is verified only right after its MAC1, and it never shows a key."""

from __future__ import annotations

import dataclasses

import pytest

from reader_sim.psam import (
    READ_TERMINAL_ID,
    Mac1Request,
    Psam,
    PsamKeys,
    block_mac_request,
    verify_mac2,
)
from sim_applet import crypto
from sim_applet.apdu import SW, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.personalize import DEMO_DRIVER_MASTER_KEY, DEMO_ISSUER_KEYS, IssuerKeys
from sim_applet.purse import PurseState
from sim_applet.structures import (
    APPLICATION_BLOCK_HEADER,
    APPLICATION_UNBLOCK_HEADER,
    GET_CHALLENGE,
    TYPE_LOAD,
)
from tests.card_helpers import (
    ALGORITHM_IDS,
    ALGORITHMS,
    DATE,
    POS_TERMINAL_ID,
    SERIAL,
    TIME,
    new_psam,
    new_sim,
    ok,
    prepare_purchase,
    send,
    state_of,
    sw_of,
)

RANDOM = bytes.fromhex("A1B2C3D4")


def _request(
    algorithm: Algorithm = Algorithm.TDES, *, key_version: int = 1, transaction_type: int = 6
) -> Mac1Request:
    return Mac1Request(RANDOM, 7, 250, transaction_type, DATE, TIME, key_version, algorithm, SERIAL)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_mac1_is_the_spec_mac_under_the_card_purchase_session_key(algorithm: Algorithm) -> None:
    """Second path: the card's own DPK (from personalization) and the §3 formula."""
    psam = new_psam(terminal_seq=0x00010005)
    answer = ok(psam, _request(algorithm).command())
    dpk = state_of(new_sim(algorithm=algorithm, select=False)).keys.dpk
    session_key = crypto.purchase_session_key(algorithm, dpk, RANDOM, 7, 0x00010005)
    signed = (250).to_bytes(4, "big") + b"\x06" + POS_TERMINAL_ID + DATE + TIME
    assert answer == bytes.fromhex("00010005") + crypto.cbc_mac(algorithm, session_key, signed)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_the_card_accepts_the_psam_mac1_and_the_psam_accepts_the_card_mac2(
    algorithm: Algorithm,
) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    answer = ok(sim, prepared.debit.command())
    assert send(psam, verify_mac2(answer[4:8])) == (b"", SW.OK)


def _mac2_for(algorithm: Algorithm, seq: int) -> bytes:
    dpk = crypto.diversify(algorithm, DEMO_ISSUER_KEYS.purchase, SERIAL)
    session_key = crypto.purchase_session_key(algorithm, dpk, RANDOM, 7, seq)
    return crypto.cbc_mac(algorithm, session_key, (250).to_bytes(4, "big"))


def test_a_wrong_mac2_answers_9302() -> None:
    psam = new_psam()
    ok(psam, _request().command())
    mac2 = _mac2_for(Algorithm.TDES, 1)
    bad = bytes((mac2[0] ^ 0x80,)) + mac2[1:]
    assert sw_of(psam, verify_mac2(bad)) == SW.MAC_INVALID


def test_mac2_verifies_right_after_its_mac1() -> None:
    psam = new_psam()
    ok(psam, _request().command())
    assert sw_of(psam, verify_mac2(_mac2_for(Algorithm.TDES, 1))) == SW.OK


def test_mac2_without_a_mac1_answers_6985() -> None:
    assert sw_of(new_psam(), verify_mac2(bytes(4))) == SW.CONDITIONS_NOT_SATISFIED


def test_mac2_is_verified_once() -> None:
    psam = new_psam()
    ok(psam, _request().command())
    mac2 = _mac2_for(Algorithm.TDES, 1)
    ok(psam, verify_mac2(mac2))
    assert sw_of(psam, verify_mac2(mac2)) == SW.CONDITIONS_NOT_SATISFIED


def test_a_failed_mac2_check_is_not_retried() -> None:
    psam = new_psam()
    ok(psam, _request().command())
    assert sw_of(psam, verify_mac2(bytes(4))) == SW.MAC_INVALID
    assert sw_of(psam, verify_mac2(_mac2_for(Algorithm.TDES, 1))) == SW.CONDITIONS_NOT_SATISFIED


def test_any_other_command_between_mac1_and_mac2_forgets_the_mac1() -> None:
    psam = new_psam()
    ok(psam, _request().command())
    ok(psam, READ_TERMINAL_ID)
    assert sw_of(psam, verify_mac2(_mac2_for(Algorithm.TDES, 1))) == SW.CONDITIONS_NOT_SATISFIED


def test_an_unknown_key_version_answers_9403_and_spends_no_sequence_number() -> None:
    psam = new_psam(terminal_seq=41)
    assert send(psam, _request(key_version=2).command()) == (b"", SW.KEY_INDEX_NOT_SUPPORTED)
    assert psam.terminal_seq == 41
    assert ok(psam, _request().command())[:4] == (41).to_bytes(4, "big")


def test_the_terminal_sequence_advances_with_each_mac1() -> None:
    psam = new_psam(terminal_seq=1)
    sequences = [int.from_bytes(ok(psam, _request().command())[:4], "big") for _ in range(3)]
    assert sequences == [1, 2, 3]
    assert psam.terminal_seq == 4


def test_the_terminal_sequence_ends_at_its_4_byte_limit() -> None:
    psam = new_psam(terminal_seq=0xFFFFFFFF)
    ok(psam, _request().command())
    assert sw_of(psam, _request().command()) == SW.CONDITIONS_NOT_SATISFIED


def test_the_psam_computes_purchase_macs_only() -> None:
    psam = new_psam()
    assert sw_of(psam, _request(transaction_type=TYPE_LOAD).command()) == SW.WRONG_DATA
    assert psam.terminal_seq == 1


@pytest.mark.parametrize("length", [29, 31])
def test_a_mac1_request_of_the_wrong_size_answers_6700(length: int) -> None:
    command = CommandApdu(0x80, 0x70, 0x00, 0x00, bytes(length), 0x08)
    assert sw_of(new_psam(), command) == SW.WRONG_LENGTH


def test_mac1_request_round_trips() -> None:
    request = _request(Algorithm.SM4)
    assert Mac1Request.decode(request.encode()) == request


def test_read_terminal_id() -> None:
    assert ok(new_psam(), READ_TERMINAL_ID) == POS_TERMINAL_ID


def test_unknown_psam_command_answers_6d00() -> None:
    assert sw_of(new_psam(), CommandApdu(0x80, 0x74, 0x00, 0x00, le=4)) == SW.INS_NOT_SUPPORTED


# --- BLOCK MAC ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_the_psam_block_mac_blocks_the_card(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    challenge = ok(sim, GET_CHALLENGE)
    mac = ok(psam, block_mac_request(SERIAL, algorithm, challenge))
    header = APPLICATION_BLOCK_HEADER
    ok(sim, CommandApdu(header[0], header[1], header[2], header[3], mac))
    assert state_of(sim).blocked


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=ALGORITHM_IDS)
def test_the_psam_block_mac_does_not_unblock(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    state_of(sim).blocked = True
    challenge = ok(sim, GET_CHALLENGE)
    mac = ok(psam, block_mac_request(SERIAL, algorithm, challenge))
    header = APPLICATION_UNBLOCK_HEADER
    assert sw_of(sim, CommandApdu(header[0], header[1], header[2], header[3], mac)) == (
        SW.MAC_INVALID
    )
    assert state_of(sim).blocked


def test_a_psam_without_the_maintenance_key_answers_6985() -> None:
    psam = Psam(PsamKeys({1: DEMO_ISSUER_KEYS.purchase}), POS_TERMINAL_ID)
    command = block_mac_request(SERIAL, Algorithm.TDES, bytes(4))
    assert sw_of(psam, command) == SW.CONDITIONS_NOT_SATISFIED


def test_a_block_mac_request_for_an_unknown_algorithm_answers_6a80() -> None:
    command = block_mac_request(SERIAL, Algorithm.TDES, bytes(4))
    command = dataclasses.replace(command, data=SERIAL + b"\x07" + bytes(4))
    assert sw_of(new_psam(), command) == SW.WRONG_DATA


# --- keys never shown ----------------------------------------------------------------------------

_ALL_KEYS = [
    DEMO_ISSUER_KEYS.load,
    DEMO_ISSUER_KEYS.purchase,
    DEMO_ISSUER_KEYS.tac,
    DEMO_ISSUER_KEYS.maintenance,
    DEMO_ISSUER_KEYS.pin_unblock,
    DEMO_DRIVER_MASTER_KEY,
]


def _used_psam() -> tuple[object, list[bytes]]:
    psam = new_psam()
    ok(psam, _request().command())  # holds a session key now
    assert psam._pending_mac2 is not None
    return psam, [psam._pending_mac2[1]]


def _card_secrets(state: PurseState) -> list[bytes]:
    keys = state.keys
    return [keys.dlk, keys.dpk, keys.dtk, keys.damk, keys.dpuk, state.pin, state.holder_data]


def _purse_state() -> tuple[object, list[bytes]]:
    state = state_of(new_sim())
    return state, _card_secrets(state)


def _purse_keys() -> tuple[object, list[bytes]]:
    state = state_of(new_sim(algorithm=Algorithm.SM4))
    return state.keys, _card_secrets(state)[:5]


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param(lambda: (DEMO_ISSUER_KEYS, []), id="IssuerKeys"),
        pytest.param(lambda: (new_psam().keys, []), id="PsamKeys"),
        pytest.param(lambda: (new_psam(), []), id="Psam"),
        pytest.param(_used_psam, id="Psam-mid-transaction"),
        pytest.param(_purse_keys, id="PurseKeys"),
        pytest.param(_purse_state, id="PurseState"),
    ],
)
def test_no_key_appears_in_repr_or_str(holder) -> None:  # type: ignore[no-untyped-def]
    obj, own_secrets = holder()
    for text in (repr(obj), str(obj)):
        for secret in [*_ALL_KEYS, *own_secrets]:
            for shown in (secret.hex(), secret.hex().upper(), repr(secret), str(list(secret))):
                assert shown not in text


def test_psam_repr_still_names_the_terminal() -> None:
    assert repr(POS_TERMINAL_ID) in repr(new_psam())


def test_issuer_keys_refuse_a_key_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        IssuerKeys(bytes(15), bytes(16), bytes(16), bytes(16), bytes(16))
