"""OTA rekeying (ota.md §3): replace a SIM's OTA keyset with the next key version over
the air, so that packets under the old version are refused afterwards.

    waiting ──no top-up in flight──▶ put_key_sent (PUT KEY under the old keys, to the ISD)
    put_key_sent ──PoR: new version ‖ KCVs──▶ done (the card's key version moves)
    put_key_sent ──no PoR in time, or the old keys refused──▶ probing
    probing (GET DATA key information under the NEW keys)
        ──secured answer──▶ done;  ──refused (the SIM still has the old keys)──▶ put_key_sent
    more than ``rekey_attempts_max`` packets ──▶ failed (flagged in the audit log)

A lost PoR cannot leave the platform and the SIM disagreeing for good: whichever keys the
SIM holds, the next packet finds out. Packet counters: a rekey's packets count on from
one above the highest the card has seen (counter_base, counter_base + 1, …), and the
card's next top-up packet counts on from its last; while a rekey is sending, that card's
top-ups wait (``topups._card_situation``), and it waits for any top-up in flight.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Exists, exists, select

from otar.keys import (
    KEY_VERSION_MAX,
    NewKeys,
    derive_kek,
    derive_keyset,
    expected_put_key_response,
    put_key_command,
)
from otar.packets import PorStatus
from otar.remote_apdu import CompactResponse
from wallet_service import audit
from wallet_service.errors import Conflict
from wallet_service.models import Card, OtaRekey, TopUpOrder
from wallet_service.services import cards
from wallet_service.services.registry import Context

rekey_attempts_max = 10  # packets, PUT KEY and probes together
por_timeout_s = 60
GET_KEY_INFORMATION = bytes.fromhex("80CA00E000")  # GlobalPlatform GET DATA, tag E0
OPEN = ("waiting", "put_key_sent", "probing")
SENDING = ("put_key_sent", "probing")


def request(ctx: Context, serial: str) -> OtaRekey:
    """Start moving the card's SIM to its next OTA key version (one rekey at a time)."""
    ctx.principal.require("admin")
    card = cards.card_by_serial(ctx, serial, lock=True)
    if card.status not in ("issued", "active"):
        raise Conflict(f"card {card.serial} is {card.status}")
    if open_for(ctx, card.serial) is not None:
        raise Conflict("a rekey of this card is already under way")
    if card.ota_key_version >= KEY_VERSION_MAX:
        raise Conflict(f"the SIM is at key version {KEY_VERSION_MAX}, the last")
    rekey = OtaRekey(
        card_serial=card.serial,
        from_version=card.ota_key_version,
        to_version=card.ota_key_version + 1,
        state="waiting",
        counter_base=0,
        attempts=0,
        next_action_at=ctx.now,
        created_at=ctx.now,
    )
    ctx.session.add(rekey)
    ctx.session.flush()
    audit.record(
        ctx.session, ctx.principal.name, "ota.rekey_requested", card.serial, ctx.now,
        to_version=rekey.to_version,
    )  # fmt: skip
    return rekey


def open_for(ctx: Context, serial: str, *, lock: bool = False) -> OtaRekey | None:
    query = select(OtaRekey).where(OtaRekey.card_serial == serial, OtaRekey.state.in_(OPEN))
    return ctx.session.scalar(query.with_for_update() if lock else query)


def latest(ctx: Context, serial: str) -> OtaRekey | None:
    return ctx.session.scalar(
        select(OtaRekey).where(OtaRekey.card_serial == serial).order_by(OtaRekey.id.desc())
    )


# --- the worker's side ---------------------------------------------------------------------


def _due(ctx: Context):  # type: ignore[no-untyped-def]
    return (OtaRekey.state.in_(OPEN), OtaRekey.next_action_at <= ctx.now)


def anything_due(ctx: Context) -> Exists:
    """(An expression: the worker asks it together with others, in one query.)"""
    return exists().where(*_due(ctx))


def work_once(ctx: Context, channel: Any) -> str | None:
    """The next due rekey step, or None. Claimed like orders (SKIP LOCKED)."""
    rekey = ctx.session.scalar(
        select(OtaRekey)
        .where(*_due(ctx))
        .order_by(OtaRekey.next_action_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if rekey is None:
        return None
    if rekey.state == "waiting":
        return _start(ctx, channel, rekey)
    if rekey.state == "put_key_sent":
        return _probe(ctx, channel, rekey)  # no answer in time: did the SIM switch?
    return _put_key(ctx, channel, rekey)  # the probe went unanswered: send PUT KEY again


def _start(ctx: Context, channel: Any, rekey: OtaRekey) -> str:
    from wallet_service.services.topups import (  # (topups imports this module)
        IN_FLIGHT,
        last_packet_counter,
    )

    # The card's row lock, as a top-up's packet 1 takes it: the two decide one after the
    # other, or both could see the card idle and send under the same counter.
    cards.card_by_serial(ctx, rekey.card_serial, lock=True)
    in_flight = ctx.session.scalar(
        select(TopUpOrder.id).where(
            TopUpOrder.card_serial == rekey.card_serial, TopUpOrder.state.in_(IN_FLIGHT)
        )
    )
    if in_flight is not None:
        rekey.next_action_at = ctx.now + timedelta(seconds=por_timeout_s)
        return "waiting for a top-up in flight"
    rekey.counter_base = last_packet_counter(ctx, rekey.card_serial) + 1
    return _put_key(ctx, channel, rekey)


def _put_key(ctx: Context, channel: Any, rekey: OtaRekey) -> str:
    if _out_of_attempts(ctx, rekey):
        return "failed"
    card = _card(ctx, rekey)
    master_kid = ctx.keys.ota_masters()[1]
    command = put_key_command(
        derive_kek(master_kid, card.iccid, rekey.from_version),
        rekey.from_version,
        _new_keys(ctx, card, rekey),
    )
    _send(ctx, channel, card, rekey, [command], rekey.from_version)
    rekey.state = "put_key_sent"
    return "PUT KEY sent"


def _probe(ctx: Context, channel: Any, rekey: OtaRekey) -> str:
    if _out_of_attempts(ctx, rekey):
        return "failed"
    _send(ctx, channel, _card(ctx, rekey), rekey, [GET_KEY_INFORMATION], rekey.to_version)
    rekey.state = "probing"
    return "probe sent"


def _send(
    ctx: Context, channel: Any, card: Card, rekey: OtaRekey, apdus: list[bytes], version: int
) -> None:
    step = rekey.counter_base + rekey.attempts
    rekey.attempts += 1
    rekey.next_action_at = ctx.now + timedelta(seconds=por_timeout_s)
    channel.send_to_security_domain(card.phone, card.serial, step, apdus, version)


def _out_of_attempts(ctx: Context, rekey: OtaRekey) -> bool:
    if rekey.attempts < rekey_attempts_max:
        return False
    rekey.state, rekey.finished_at, rekey.next_action_at = "failed", ctx.now, None
    audit.record(
        ctx.session, "worker", "ota.rekey_failed", rekey.card_serial, ctx.now,
        to_version=rekey.to_version,
    )  # fmt: skip
    return True


def _card(ctx: Context, rekey: OtaRekey) -> Card:
    return cards.card_by_serial(ctx, rekey.card_serial)


def _new_keys(ctx: Context, card: Card, rekey: OtaRekey) -> NewKeys:
    master_kic, master_kid = ctx.keys.ota_masters()
    keyset = derive_keyset(master_kic, master_kid, card.iccid, rekey.to_version)
    kek = derive_kek(master_kid, card.iccid, rekey.to_version)
    return NewKeys(rekey.to_version, keyset.kic, keyset.kid, kek)


# --- proofs of receipt from the security domain -----------------------------------------


def on_proof_of_receipt(ctx: Context, channel: Any, serial: str, raw: bytes) -> str:
    from wallet_service.ota_channel import read_por

    rekey = open_for(ctx, serial, lock=True)
    if rekey is None or rekey.state not in SENDING:
        return "stale: no rekey under way"
    card = _card(ctx, rekey)
    old, new = (
        channel.keyset_for(serial, rekey.from_version),
        channel.keyset_for(serial, rekey.to_version),
    )
    for keyset in (old, new) if rekey.state == "put_key_sent" else (new, old):
        por = read_por(keyset, raw)
        if isinstance(por, str):
            continue
        if por.status is not PorStatus.OK:
            return _refused(ctx, channel, rekey, por.status)
        if not rekey.counter_base <= por.counter < rekey.counter_base + rekey.attempts:
            return "stale"
        return _answered(ctx, rekey, card, keyset is new, por.data)
    return "forged or damaged proof of receipt"


def _answered(ctx: Context, rekey: OtaRekey, card: Card, under_new: bool, data: bytes) -> str:
    try:
        answer = CompactResponse.decode(data)
    except ValueError:
        return "forged or damaged proof of receipt"
    switched = under_new or (
        answer.last_sw == 0x9000
        and answer.last_data == expected_put_key_response(_new_keys(ctx, card, rekey))
    )
    if not switched:
        return f"PUT KEY refused: {answer.last_sw:04X}"  # the probe's timeout decides
    card.ota_key_version = rekey.to_version
    rekey.state, rekey.finished_at, rekey.next_action_at = "done", ctx.now, None
    audit.record(
        ctx.session, "worker", "ota.rekeyed", card.serial, ctx.now, version=rekey.to_version
    )
    return f"rekeyed to version {rekey.to_version}"


def _refused(ctx: Context, channel: Any, rekey: OtaRekey, status: PorStatus) -> str:
    """An unsecured refusal: the keys of the packet were unknown to the SIM (or it was a
    replay). Under the old keys: perhaps the SIM switched — probe; under the new: it did
    not — PUT KEY again."""
    if rekey.state == "put_key_sent":
        return _probe(ctx, channel, rekey) + f" after {status.name}"
    return _put_key(ctx, channel, rekey) + f" after {status.name}"
