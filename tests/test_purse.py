"""Every command of card-application.md §2 through ``Sim.transmit``, byte for byte, in both
algorithm profiles where cryptography is involved."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reader_sim.psam import verify_mac2
from sim_applet.apdu import SW, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.issuer import purchase_tac
from sim_applet.personalize import DEMO_ISSUER_KEYS
from sim_applet.purse import Command, Session, next_session
from sim_applet.sim import Sim
from sim_applet.structures import (
    APPLICATION_UNBLOCK_HEADER,
    GET_BALANCE,
    GET_CHALLENGE,
    SFI_CAPP,
    SFI_HOLDER,
    SFI_LOG,
    SFI_PUBLIC,
    TRANSIT_AID,
    TYPE_CAPP_PURCHASE,
    TYPE_LOAD,
    TYPE_PURCHASE,
    DebitForPurchaseRequest,
    DebitForPurchaseResponse,
    InitializeForPurchaseResponse,
    InitializeRequest,
    LogRecord,
    PublicData,
    TransactionProof,
    get_transaction_prove,
    initialize_for_load,
    initialize_for_purchase,
    log_record_bytes,
    log_records_max,
    read_binary,
    read_record,
    select_by_aid,
    verify_pin,
)
from tests.card_helpers import (
    ALGORITHM_IDS,
    ALGORITHMS,
    DATE,
    HOLDER_DATA,
    LOAD_TERMINAL_ID,
    PIN,
    POS_TERMINAL_ID,
    SERIAL,
    TIME,
    flip_bit,
    hex_bytes,
    load,
    load_vectors,
    maintenance_command,
    new_psam,
    new_sim,
    ok,
    prepare_load,
    prepare_purchase,
    purchase,
    send,
    snapshot,
    state_of,
    sw_of,
    update_capp_data_cache,
)

SECTION_6 = load_vectors("purchase_3des_card_application_6.json")
NEGATIVE_MAC = load_vectors("negative_mac.json")

SELECT_MF = CommandApdu(0x00, 0xA4, 0x00, 0x00, bytes.fromhex("3F00"))
SELECT_1001 = CommandApdu(0x00, 0xA4, 0x00, 0x00, bytes.fromhex("1001"))
# Well-formed completions with wrong MACs: only the session decides their fate.
_CREDIT = CommandApdu(0x80, 0x52, 0x00, 0x00, DATE + TIME + bytes(4), 0x04)
_DEBIT = DebitForPurchaseRequest(1, DATE, TIME, bytes(4)).command()


@pytest.fixture(params=ALGORITHMS, ids=ALGORITHM_IDS)
def algorithm(request: pytest.FixtureRequest) -> Algorithm:
    return request.param  # type: ignore[no-any-return]


def balance_of(sim: Sim) -> int:
    return int.from_bytes(ok(sim, GET_BALANCE), "big")


def _tlv_children(data: bytes) -> dict[int, bytes]:
    """One level of short-form BER-TLV with 1-byte tags (enough for 6F's children)."""
    children, at = {}, 0
    while at < len(data):
        tag, length = data[at], data[at + 1]
        children[tag] = data[at + 2 : at + 2 + length]
        at += 2 + length
    assert at == len(data)
    return children


# --- §1 selection --------------------------------------------------------------------------


def test_select_by_aid_answers_fci_6f_with_df_name_84_and_proprietary_a5() -> None:
    sim = new_sim(select=False)
    fci, sw = send(sim, select_by_aid(TRANSIT_AID))
    assert sw == SW.OK
    assert fci[0] == 0x6F and fci[1] == len(fci) - 2
    template = _tlv_children(fci[2:])
    assert template[0x84] == TRANSIT_AID
    assert 0xA5 in template


def test_select_by_fid_3f00_then_1001_selects_the_purse() -> None:
    sim = new_sim(select=False, balance_fen=1234)
    ok(sim, SELECT_MF)
    fci = ok(sim, SELECT_1001)
    assert _tlv_children(fci[2:])[0x84] == TRANSIT_AID
    assert balance_of(sim) == 1234


def test_select_with_p2_0c_answers_no_fci() -> None:
    sim = new_sim(select=False)
    command = CommandApdu(0x00, 0xA4, 0x04, 0x0C, TRANSIT_AID)
    assert send(sim, command) == (b"", SW.OK)


def test_selecting_the_mf_deselects_the_purse() -> None:
    sim = new_sim()
    ok(sim, SELECT_MF)
    assert sw_of(sim, GET_BALANCE) == SW.CONDITIONS_NOT_SATISFIED


# --- GET BALANCE, READ BINARY ----------------------------------------------------------------


def test_get_balance_answers_4_bytes_big_endian_fen() -> None:
    sim = new_sim(balance_fen=0x012345)
    assert send(sim, GET_BALANCE) == (bytes.fromhex("00012345"), SW.OK)


def test_read_binary_0x15_is_the_30_byte_public_data_with_the_serial() -> None:
    sim = new_sim()
    data = ok(sim, read_binary(SFI_PUBLIC))
    assert len(data) == 30
    public = PublicData.decode(data)
    assert public.serial == SERIAL
    assert public.encode() == data


@pytest.mark.parametrize(("offset", "le"), [(0, 1), (0, 10), (10, 10), (20, 10), (29, 1)])
def test_read_binary_answers_le_bytes_from_the_offset(offset: int, le: int) -> None:
    sim = new_sim()
    whole = ok(sim, read_binary(SFI_PUBLIC))
    assert ok(sim, read_binary(SFI_PUBLIC, offset, le)) == whole[offset : offset + le]


@pytest.mark.parametrize(
    ("offset", "le", "sw"), [(0, 31, 0x6C1E), (10, 21, 0x6C14), (28, 3, 0x6C02)]
)
def test_read_binary_le_past_the_end_answers_6cxx_with_the_bytes_available(
    offset: int, le: int, sw: int
) -> None:
    sim = new_sim()
    assert send(sim, read_binary(SFI_PUBLIC, offset, le)) == (b"", sw)


def test_read_binary_0x16_needs_the_pin() -> None:
    sim = new_sim()
    assert sw_of(sim, read_binary(SFI_HOLDER)) == SW.SECURITY_STATUS_NOT_SATISFIED
    ok(sim, verify_pin(PIN))
    assert ok(sim, read_binary(SFI_HOLDER)) == HOLDER_DATA


def test_a_verified_pin_is_forgotten_at_reselection_and_power_cycle() -> None:
    sim = new_sim()
    ok(sim, verify_pin(PIN))
    ok(sim, select_by_aid(TRANSIT_AID))
    assert sw_of(sim, read_binary(SFI_HOLDER)) == SW.SECURITY_STATUS_NOT_SATISFIED
    ok(sim, verify_pin(PIN))
    sim.power_off()
    sim.power_on()
    ok(sim, select_by_aid(TRANSIT_AID))
    assert sw_of(sim, read_binary(SFI_HOLDER)) == SW.SECURITY_STATUS_NOT_SATISFIED


# --- the transaction log (SFI 0x18) ---------------------------------------------------------


def test_log_is_newest_first_23_byte_records_with_the_ctc_initialize_returned() -> None:
    sim, psam = new_sim(balance_fen=0), new_psam()
    loaded = prepare_load(sim, 500)
    ok(sim, loaded.credit.command())
    first = prepare_purchase(sim, psam, 120)
    ok(sim, first.debit.command())
    second = prepare_purchase(sim, psam, 80)
    ok(sim, second.debit.command())

    records = [ok(sim, read_record(SFI_LOG, number)) for number in (1, 2, 3)]
    assert all(len(record) == log_record_bytes for record in records)
    newest, middle, oldest = (LogRecord.decode(record) for record in records)
    assert (newest.transaction_type, newest.amount, newest.ctc) == (
        TYPE_PURCHASE,
        80,
        second.card.offline_ctc,
    )
    assert (middle.transaction_type, middle.amount, middle.ctc) == (
        TYPE_PURCHASE,
        120,
        first.card.offline_ctc,
    )
    assert (oldest.transaction_type, oldest.amount, oldest.ctc) == (
        TYPE_LOAD,
        500,
        loaded.card.online_ctc,
    )
    assert newest.terminal_id == POS_TERMINAL_ID and oldest.terminal_id == LOAD_TERMINAL_ID
    assert (newest.date_bcd, newest.time_bcd) == (DATE, TIME)
    assert sw_of(sim, read_record(SFI_LOG, 4)) == SW.RECORD_NOT_FOUND


def test_log_keeps_the_10_newest_records() -> None:
    sim, psam = new_sim(balance_fen=1000), new_psam()
    for amount in range(1, log_records_max + 2):
        purchase(sim, psam, amount)
    assert LogRecord.decode(ok(sim, read_record(SFI_LOG, 1))).amount == log_records_max + 1
    assert LogRecord.decode(ok(sim, read_record(SFI_LOG, log_records_max))).amount == 2
    assert sw_of(sim, read_record(SFI_LOG, log_records_max + 1)) == SW.RECORD_NOT_FOUND


def test_read_record_with_a_smaller_le_answers_the_head_of_the_record() -> None:
    sim, psam = new_sim(), new_psam()
    purchase(sim, psam, 10)
    whole = ok(sim, read_record(SFI_LOG, 1))
    assert ok(sim, read_record(SFI_LOG, 1, 2)) == whole[:2]


# --- load ------------------------------------------------------------------------------------


def test_load_credits_and_the_card_tac_matches_the_issuer_tac(algorithm: Algorithm) -> None:
    sim = new_sim(algorithm=algorithm, balance_fen=300)
    before = state_of(sim)
    online_ctc, offline_ctc = before.online_ctc, before.offline_ctc
    prepared = prepare_load(sim, 2000)  # authorize_load verified the card's MAC1
    assert prepared.card.algorithm is algorithm
    assert prepared.card.old_balance == 300 and prepared.card.online_ctc == online_ctc

    tac = ok(sim, prepared.credit.command())

    assert tac == prepared.authorization.expected_tac(DEMO_ISSUER_KEYS, DATE, TIME)
    assert balance_of(sim) == 2300
    assert state_of(sim).online_ctc == online_ctc + 1
    assert state_of(sim).offline_ctc == offline_ctc
    record = LogRecord.decode(ok(sim, read_record(SFI_LOG, 1)))
    assert (record.transaction_type, record.amount, record.ctc) == (TYPE_LOAD, 2000, online_ctc)


def test_load_proof_is_the_host_mac2_and_the_card_tac(algorithm: Algorithm) -> None:
    sim = new_sim(algorithm=algorithm)
    prepared = prepare_load(sim, 100)
    tac = ok(sim, prepared.credit.command())
    answer = ok(sim, get_transaction_prove(TYPE_LOAD, prepared.card.online_ctc + 1))
    assert TransactionProof.decode(answer) == TransactionProof(prepared.credit.mac2, tac)


def test_load_up_to_the_balance_limit_is_accepted() -> None:
    sim = new_sim(balance_fen=99_000, balance_limit_fen=100_000)
    load(sim, 1_000)
    assert balance_of(sim) == 100_000


def test_load_past_the_balance_limit_answers_9406_and_changes_nothing() -> None:
    sim = new_sim(balance_fen=99_000, balance_limit_fen=100_000)
    before = snapshot(sim)
    request = InitializeRequest(1, 1_001, LOAD_TERMINAL_ID)
    assert send(sim, initialize_for_load(request)) == (b"", SW.AMOUNT_OR_BALANCE_LIMIT)
    assert snapshot(sim) == before
    assert sw_of(sim, _CREDIT) == SW.CONDITIONS_NOT_SATISFIED


# --- purchase --------------------------------------------------------------------------------


def test_purchase_debits_and_the_card_tac_matches_clearing(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm, balance_fen=1000), new_psam()
    prepared = prepare_purchase(sim, psam, 250)
    assert prepared.card.balance == 1000 and prepared.card.algorithm is algorithm

    answer = DebitForPurchaseResponse.decode(ok(sim, prepared.debit.command()))

    assert send(psam, verify_mac2(answer.mac2)) == (b"", SW.OK)
    assert answer.tac == purchase_tac(
        DEMO_ISSUER_KEYS,
        algorithm,
        SERIAL,
        amount=250,
        transaction_type=TYPE_PURCHASE,
        terminal_id=POS_TERMINAL_ID,
        terminal_seq=prepared.debit.terminal_seq,
        date_bcd=DATE,
        time_bcd=TIME,
    )
    assert balance_of(sim) == 750
    assert state_of(sim).offline_ctc == prepared.card.offline_ctc + 1


def test_purchase_of_the_whole_balance_leaves_zero() -> None:
    sim, psam = new_sim(balance_fen=200), new_psam()
    purchase(sim, psam, 200)
    assert balance_of(sim) == 0


def test_purchase_over_the_balance_answers_9401_and_changes_nothing() -> None:
    sim = new_sim(balance_fen=199)
    before = snapshot(sim)
    request = InitializeRequest(1, 200, POS_TERMINAL_ID)
    assert send(sim, initialize_for_purchase(request)) == (b"", SW.INSUFFICIENT_FUNDS)
    assert snapshot(sim) == before


def test_a_purchase_never_takes_the_unsigned_balance_below_zero() -> None:
    """§1: amounts and the balance are unsigned; an overdraft limit does not make room."""
    sim = new_sim(balance_fen=100)
    state_of(sim).overdraft_limit = 500
    request = InitializeRequest(1, 101, POS_TERMINAL_ID)
    assert sw_of(sim, initialize_for_purchase(request)) == SW.INSUFFICIENT_FUNDS
    assert balance_of(sim) == 100


@pytest.mark.parametrize(
    "initialize", [initialize_for_load, initialize_for_purchase], ids=["load", "purchase"]
)
@pytest.mark.parametrize("key_index", [0, 2, 0xFF])
def test_unknown_key_index_answers_9403(initialize: Any, key_index: int) -> None:
    sim = new_sim()
    request = InitializeRequest(key_index, 100, POS_TERMINAL_ID)
    assert send(sim, initialize(request)) == (b"", SW.KEY_INDEX_NOT_SUPPORTED)


def test_purchase_proof_is_mac2_then_tac_for_ctc_plus_one(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    prepared = prepare_purchase(sim, psam, 30)
    answer = DebitForPurchaseResponse.decode(ok(sim, prepared.debit.command()))
    proof = ok(sim, get_transaction_prove(TYPE_PURCHASE, prepared.card.offline_ctc + 1))
    assert proof == answer.mac2 + answer.tac


@pytest.mark.parametrize(
    ("transaction_type", "ctc_delta"),
    [(TYPE_PURCHASE, 0), (TYPE_PURCHASE, 2), (TYPE_LOAD, 1), (TYPE_CAPP_PURCHASE, 1)],
    ids=["ctc-itself", "ctc-plus-two", "wrong-type-load", "wrong-type-capp"],
)
def test_transaction_prove_for_another_transaction_answers_6985(
    transaction_type: int, ctc_delta: int
) -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 30)
    ok(sim, prepared.debit.command())
    ctc = prepared.card.offline_ctc + ctc_delta
    assert send(sim, get_transaction_prove(transaction_type, ctc)) == (
        b"",
        SW.CONDITIONS_NOT_SATISFIED,
    )


# --- CAPP purchase and UPDATE CAPP DATA CACHE -------------------------------------------------

STATION = bytes.fromhex("0001 0203 20261125073000 00000064")


def test_capp_purchase_writes_the_compound_record_and_logs_type_09(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    answer = purchase(sim, psam, 100, capp=True, capp_update=(2, STATION))
    assert ok(sim, read_record(SFI_CAPP, 2)) == STATION
    record = LogRecord.decode(ok(sim, read_record(SFI_LOG, 1)))
    assert record.transaction_type == TYPE_CAPP_PURCHASE
    assert answer.tac == purchase_tac(
        DEMO_ISSUER_KEYS,
        algorithm,
        SERIAL,
        amount=100,
        transaction_type=TYPE_CAPP_PURCHASE,
        terminal_id=POS_TERMINAL_ID,
        terminal_seq=1,
        date_bcd=DATE,
        time_bcd=TIME,
    )
    proof = ok(sim, get_transaction_prove(TYPE_CAPP_PURCHASE, record.ctc + 1))
    assert proof == answer.mac2 + answer.tac


def test_capp_purchase_without_update_leaves_the_compound_file_alone() -> None:
    sim, psam = new_sim(), new_psam()
    purchase(sim, psam, 100, capp=True)
    assert sw_of(sim, read_record(SFI_CAPP, 1)) == SW.RECORD_NOT_FOUND
    assert balance_of(sim) == 900


def test_capp_cache_is_not_written_when_the_debit_fails() -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100, capp=True, capp_update=(1, STATION))
    before = snapshot(sim)
    bad = dataclasses.replace(prepared.debit, mac1=flip_bit(prepared.debit.mac1, 0))
    assert send(sim, bad.command()) == (b"", SW.MAC_INVALID)
    assert snapshot(sim) == before
    assert sw_of(sim, read_record(SFI_CAPP, 1)) == SW.RECORD_NOT_FOUND


def test_capp_cache_is_not_written_when_the_transaction_is_abandoned() -> None:
    sim = new_sim()
    before = snapshot(sim)
    ok(sim, initialize_for_purchase(InitializeRequest(1, 100, POS_TERMINAL_ID), capp=True))
    ok(sim, update_capp_data_cache(1, STATION))
    ok(sim, GET_BALANCE)
    assert snapshot(sim) == before
    assert sw_of(sim, read_record(SFI_CAPP, 1)) == SW.RECORD_NOT_FOUND


def test_update_capp_data_cache_is_refused_in_a_plain_purchase() -> None:
    sim = new_sim()
    ok(sim, initialize_for_purchase(InitializeRequest(1, 100, POS_TERMINAL_ID)))
    assert sw_of(sim, update_capp_data_cache(1, STATION)) == SW.CONDITIONS_NOT_SATISFIED


# --- §6 vector on the card, byte for byte -----------------------------------------------------


def _section_6_card() -> Sim:
    """A card holding the §6 DPK, whose random source answers the §6 random."""
    v = SECTION_6
    sim = new_sim(balance_fen=0x2000, random_source=lambda n: hex_bytes(v["random"])[:n])
    state = state_of(sim)
    state.keys = dataclasses.replace(state.keys, dpk=hex_bytes(v["dpk"]))
    request = InitializeRequest(1, int(v["amount"], 16), hex_bytes(v["terminal_id"]))
    card = InitializeForPurchaseResponse.decode(ok(sim, initialize_for_purchase(request)))
    assert card.random == hex_bytes(v["random"])
    assert card.offline_ctc == int(v["offline_ctc"], 16)
    return sim


def _section_6_debit(mac1: bytes) -> DebitForPurchaseRequest:
    v = SECTION_6
    return DebitForPurchaseRequest(
        int(v["terminal_seq"], 16), hex_bytes(v["date"]), hex_bytes(v["time"]), mac1
    )


def test_the_card_accepts_the_section_6_mac1_and_answers_its_mac2() -> None:
    sim = _section_6_card()
    answer = DebitForPurchaseResponse.decode(
        ok(sim, _section_6_debit(hex_bytes(SECTION_6["mac1"])).command())
    )
    assert answer.mac2 == hex_bytes(SECTION_6["mac2"])
    assert balance_of(sim) == 0x2000 - 0x1000


def test_the_section_6_debit_with_mac1_bit_0_flipped_answers_9302_byte_exact() -> None:
    vector = NEGATIVE_MAC["section_6_debit"]
    sim = _section_6_card()
    before = snapshot(sim)
    assert sim.transmit(hex_bytes(vector["apdu"])).hex().upper() == vector["sw"]
    assert snapshot(sim) == before


# --- negative MAC vectors ----------------------------------------------------------------------


def _cases(command: str) -> list[dict[str, Any]]:
    return [case for case in NEGATIVE_MAC["cases"] if case["command"] == command]


@pytest.mark.parametrize("case", _cases("DEBIT FOR PURCHASE"), ids=lambda c: f"bit{c['bit']}")
def test_debit_with_one_flipped_mac1_bit_answers_9302_and_changes_nothing(
    case: dict[str, Any], algorithm: Algorithm
) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    before = snapshot(sim)
    bad = dataclasses.replace(prepared.debit, mac1=flip_bit(prepared.debit.mac1, case["bit"]))
    assert send(sim, bad.command()) == (b"", int(case["sw"], 16))
    assert snapshot(sim) == before
    # and the session is gone: the right MAC1 no longer debits
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == before


@pytest.mark.parametrize("case", _cases("CREDIT FOR LOAD"), ids=lambda c: f"bit{c['bit']}")
def test_credit_with_one_flipped_mac2_bit_answers_9302_and_changes_nothing(
    case: dict[str, Any], algorithm: Algorithm
) -> None:
    sim = new_sim(algorithm=algorithm)
    prepared = prepare_load(sim, 100)
    before = snapshot(sim)
    bad = dataclasses.replace(prepared.credit, mac2=flip_bit(prepared.credit.mac2, case["bit"]))
    assert send(sim, bad.command()) == (b"", int(case["sw"], 16))
    assert snapshot(sim) == before
    assert sw_of(sim, prepared.credit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == before


@pytest.mark.parametrize("case", _cases("APPLICATION BLOCK"), ids=lambda c: f"bit{c['bit']}")
def test_block_with_one_flipped_mac_bit_answers_9302_and_changes_nothing(
    case: dict[str, Any], algorithm: Algorithm
) -> None:
    sim = new_sim(algorithm=algorithm)
    command = maintenance_command(sim)
    before = snapshot(sim)
    bad = dataclasses.replace(command, data=flip_bit(command.data, case["bit"]))
    assert send(sim, bad) == (b"", int(case["sw"], 16))
    assert snapshot(sim) == before
    assert sw_of(sim, select_by_aid(TRANSIT_AID)) == SW.OK


# --- the session transition table -------------------------------------------------------------


def test_debit_without_initialize_answers_6985() -> None:
    sim = new_sim()
    assert send(sim, _DEBIT) == (b"", SW.CONDITIONS_NOT_SATISFIED)


def test_credit_without_initialize_answers_6985() -> None:
    sim = new_sim()
    assert send(sim, _CREDIT) == (b"", SW.CONDITIONS_NOT_SATISFIED)


_INTERLOPERS = {
    "get-balance": GET_BALANCE,
    "read-binary": read_binary(SFI_PUBLIC),
    "read-record": read_record(SFI_LOG, 1),
    "get-challenge": GET_CHALLENGE,
    "verify-pin": verify_pin(PIN),
    "select-again": select_by_aid(TRANSIT_AID),
    "initialize-for-load": initialize_for_load(InitializeRequest(1, 1, LOAD_TERMINAL_ID)),
    "unknown-ins": CommandApdu(0x80, 0xCA, 0x9F, 0x79, le=256),
    "wrong-cla": CommandApdu(0x90, 0x5C, 0x00, 0x02, le=4),
    "initialize-bad-p1": CommandApdu(0x80, 0x50, 0x07, 0x02, bytes(11), 0x0F),
    "wrong-p1p2": CommandApdu(0x80, 0x5C, 0x01, 0x02, le=4),
}


@pytest.mark.parametrize("interloper", list(_INTERLOPERS.values()), ids=list(_INTERLOPERS))
def test_anything_between_initialize_and_debit_cancels_the_purchase(
    interloper: CommandApdu,
) -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    before = snapshot(sim)
    sim.transmit(interloper.encode())
    after_interloper = snapshot(sim)
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == after_interloper
    assert state_of(sim).balance == before["applications"][0]["balance"]


@pytest.mark.parametrize(
    "refused",
    ["80 5C 00", "80 5C 00 02 05 01 02", "00 A4 04 04 08 A000000632010105"],
    ids=["too-short", "lc-mismatch", "select-bad-p2"],
)
def test_an_apdu_refused_at_the_sim_door_also_cancels_the_purchase(refused: str) -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    assert sim.transmit(hex_bytes(refused))[-2:] in (b"\x67\x00", b"\x6a\x86")
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED


def test_initialize_for_load_then_debit_answers_6985_and_cancels_the_load() -> None:
    sim = new_sim()
    prepared = prepare_load(sim, 100)
    before = snapshot(sim)
    assert sw_of(sim, _DEBIT) == SW.CONDITIONS_NOT_SATISFIED
    assert sw_of(sim, prepared.credit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == before


def test_initialize_for_purchase_then_credit_answers_6985() -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    assert sw_of(sim, _CREDIT) == SW.CONDITIONS_NOT_SATISFIED
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED


def test_a_debit_is_accepted_once() -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    ok(sim, prepared.debit.command())
    after = snapshot(sim)
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == after


@pytest.mark.parametrize("cycle", ["power-off-on", "reset"])
def test_a_power_cycle_forgets_the_pending_purchase(cycle: str) -> None:
    sim, psam = new_sim(), new_psam()
    prepared = prepare_purchase(sim, psam, 100)
    before = snapshot(sim)
    if cycle == "reset":
        sim.reset()
    else:
        sim.power_off()
        assert sim.transmit(GET_BALANCE.encode()) == b""
        sim.power_on()
    ok(sim, select_by_aid(TRANSIT_AID))
    assert sw_of(sim, prepared.debit.command()) == SW.CONDITIONS_NOT_SATISFIED
    assert snapshot(sim) == before


_S, _C = Session, Command


@pytest.mark.parametrize(
    ("session", "command", "after"),
    [
        (_S.IDLE, _C.DEBIT_FOR_PURCHASE, None),
        (_S.IDLE, _C.CREDIT_FOR_LOAD, None),
        (_S.IDLE, _C.UPDATE_CAPP_DATA_CACHE, None),
        (_S.LOAD, _C.CREDIT_FOR_LOAD, _S.IDLE),
        (_S.LOAD, _C.DEBIT_FOR_PURCHASE, None),
        (_S.PURCHASE, _C.DEBIT_FOR_PURCHASE, _S.IDLE),
        (_S.PURCHASE, _C.UPDATE_CAPP_DATA_CACHE, None),
        (_S.PURCHASE, _C.CREDIT_FOR_LOAD, None),
        (_S.CAPP, _C.UPDATE_CAPP_DATA_CACHE, _S.CAPP_CACHED),
        (_S.CAPP, _C.DEBIT_FOR_PURCHASE, _S.IDLE),
        (_S.CAPP_CACHED, _C.DEBIT_FOR_PURCHASE, _S.IDLE),
        (_S.CAPP_CACHED, _C.UPDATE_CAPP_DATA_CACHE, None),
        (_S.PURCHASE, _C.GET_BALANCE, _S.IDLE),
        (_S.LOAD, _C.INITIALIZE_FOR_PURCHASE, _S.PURCHASE),
        (_S.IDLE, _C.INITIALIZE_FOR_LOAD, _S.LOAD),
        (_S.IDLE, _C.INITIALIZE_FOR_CAPP_PURCHASE, _S.CAPP),
    ],
)
def test_session_transition_table(
    session: Session, command: Command, after: Session | None
) -> None:
    assert next_session(session, command) is after


# --- PIN ---------------------------------------------------------------------------------------

WRONG_PIN = bytes.fromhex("654321")


def test_wrong_pin_counts_down_63c2_63c1_63c0_then_6983() -> None:
    sim = new_sim()
    answers = [sw_of(sim, verify_pin(WRONG_PIN)) for _ in range(4)]
    assert answers == [0x63C2, 0x63C1, 0x63C0, SW.PIN_BLOCKED]
    assert sw_of(sim, verify_pin(PIN)) == SW.PIN_BLOCKED
    assert state_of(sim).pin_tries_left == 0


def test_a_blocked_pin_stays_blocked_across_a_power_cycle() -> None:
    sim = new_sim()
    for _ in range(3):
        sim.transmit(verify_pin(WRONG_PIN).encode())
    sim.power_off()
    sim.power_on()
    ok(sim, select_by_aid(TRANSIT_AID))
    assert sw_of(sim, verify_pin(PIN)) == SW.PIN_BLOCKED


def test_the_right_pin_resets_the_tries() -> None:
    sim = new_sim()
    assert sw_of(sim, verify_pin(WRONG_PIN)) == 0x63C2
    assert sw_of(sim, verify_pin(WRONG_PIN)) == 0x63C1
    ok(sim, verify_pin(PIN))
    assert state_of(sim).pin_tries_left == 3
    assert sw_of(sim, verify_pin(WRONG_PIN)) == 0x63C2


def test_a_wrong_pin_forgets_an_earlier_verification() -> None:
    sim = new_sim()
    ok(sim, verify_pin(PIN))
    sim.transmit(verify_pin(WRONG_PIN).encode())
    assert sw_of(sim, read_binary(SFI_HOLDER)) == SW.SECURITY_STATUS_NOT_SATISFIED


def change_pin(old: bytes, new: bytes) -> CommandApdu:
    return CommandApdu(0x80, 0x5E, 0x01, 0x00, old + b"\xff" + new)


NEW_PIN = bytes.fromhex("2468")


def test_change_pin_replaces_the_pin() -> None:
    sim = new_sim()
    ok(sim, change_pin(PIN, NEW_PIN))
    assert sw_of(sim, verify_pin(PIN)) == 0x63C2
    ok(sim, verify_pin(NEW_PIN))


def test_change_pin_with_the_wrong_old_pin_counts_a_try_and_keeps_the_pin() -> None:
    sim = new_sim()
    assert sw_of(sim, change_pin(WRONG_PIN, NEW_PIN)) == 0x63C2
    assert state_of(sim).pin == PIN
    ok(sim, verify_pin(PIN))


@pytest.mark.parametrize("new", [b"\x12", bytes(7)], ids=["1-byte", "7-bytes"])
def test_change_pin_to_a_pin_of_wrong_size_answers_6a80_and_counts_no_try(new: bytes) -> None:
    sim = new_sim()
    before = snapshot(sim)
    assert sw_of(sim, change_pin(PIN, new)) == SW.WRONG_DATA
    assert snapshot(sim) == before


# --- APPLICATION BLOCK / UNBLOCK -----------------------------------------------------------------


def test_block_makes_select_answer_6283_and_purses_refuse(algorithm: Algorithm) -> None:
    sim = new_sim(algorithm=algorithm, balance_fen=700)
    ok(sim, maintenance_command(sim))
    assert state_of(sim).blocked

    fci, sw = send(sim, select_by_aid(TRANSIT_AID))
    assert sw == SW.SELECTED_APPLICATION_BLOCKED and fci[0] == 0x6F
    purchase_request = InitializeRequest(1, 100, POS_TERMINAL_ID)
    load_request = InitializeRequest(1, 100, LOAD_TERMINAL_ID)
    assert sw_of(sim, initialize_for_purchase(purchase_request)) == SW.CONDITIONS_NOT_SATISFIED
    capp = initialize_for_purchase(purchase_request, capp=True)
    assert sw_of(sim, capp) == SW.CONDITIONS_NOT_SATISFIED
    assert sw_of(sim, initialize_for_load(load_request)) == SW.CONDITIONS_NOT_SATISFIED
    assert balance_of(sim) == 700
    assert ok(sim, read_binary(SFI_PUBLIC))


def test_unblock_restores_the_purse(algorithm: Algorithm) -> None:
    sim, psam = new_sim(algorithm=algorithm), new_psam()
    ok(sim, maintenance_command(sim))
    ok(sim, maintenance_command(sim, APPLICATION_UNBLOCK_HEADER))
    assert sw_of(sim, select_by_aid(TRANSIT_AID)) == SW.OK
    purchase(sim, psam, 100)
    assert balance_of(sim) == 900


def test_block_without_get_challenge_answers_6985() -> None:
    sim = new_sim()
    command = maintenance_command(sim)
    ok(sim, select_by_aid(TRANSIT_AID))  # reselection forgets the challenge
    assert sw_of(sim, command) == SW.CONDITIONS_NOT_SATISFIED
    assert not state_of(sim).blocked


def test_a_challenge_serves_one_block_attempt() -> None:
    sim = new_sim()
    command = maintenance_command(sim)
    bad = dataclasses.replace(command, data=flip_bit(command.data, 5))
    assert sw_of(sim, bad) == SW.MAC_INVALID
    assert sw_of(sim, command) == SW.CONDITIONS_NOT_SATISFIED
    assert not state_of(sim).blocked


def test_a_block_mac_does_not_unblock() -> None:
    sim = new_sim()
    ok(sim, maintenance_command(sim))
    block_mac = maintenance_command(sim).data
    unblock = CommandApdu(0x84, 0x18, 0x00, 0x00, block_mac)
    assert sw_of(sim, unblock) == SW.MAC_INVALID
    assert state_of(sim).blocked


def test_get_challenge_answers_4_fresh_bytes() -> None:
    sim = new_sim()
    first, second = ok(sim, GET_CHALLENGE), ok(sim, GET_CHALLENGE)
    assert len(first) == len(second) == 4 and first != second
