"""The top-up orders' OTA channel over SMS: each step's APDUs as one secured command packet
(otar), its counter the order's step id — strictly rising per card, and echoed in the PoR,
which ties every answer to its step. PoRs come back as SMS to the platform's short code."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from otar.keys import derive_keyset
from otar.packets import (
    CounterMode,
    Integrity,
    OtaKeyset,
    PorRequest,
    PorStatus,
    Spi,
    decode_por,
    encode_command,
)
from otar.remote_apdu import CompactResponse, encode_script
from otar.sim_side import TRANSIT_TAR
from reader_sim.smsc import Sms
from wallet_service.models import Card
from wallet_service.services import topups
from wallet_service.services.registry import Context
from wallet_service.sms_gateway import SmsGateway

COMMAND_UDH = bytes.fromhex("027000")  # UDHL 02, IEI 70 (command packet), length 00
RESPONSE_UDH = bytes.fromhex("027100")
SECURITY = Spi()  # ciphered, CC, counter must be higher, PoR always, ciphered with CC
UNSECURED = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)


class SmsOtaChannel:
    def __init__(self, gateway: SmsGateway, keyset_for: Callable[[str], OtaKeyset]) -> None:
        self.gateway, self.keyset_for = gateway, keyset_for

    def send(self, phone: str, card_serial: str, step: int, apdus: list[bytes]) -> None:
        packet = encode_command(
            self.keyset_for(card_serial), SECURITY, TRANSIT_TAR, step, encode_script(apdus)
        )
        self.gateway.send(phone, packet, COMMAND_UDH)


def keyset_lookup(ctx: Context, masters: tuple[bytes, bytes]) -> Callable[[str], OtaKeyset]:
    def keyset_for(card_serial: str) -> OtaKeyset:
        iccid = ctx.session.scalar(select(Card.iccid).where(Card.serial == card_serial))
        if iccid is None:
            raise LookupError(f"no card {card_serial}")
        return derive_keyset(*masters, iccid)

    return keyset_for


def handle_incoming_sms(ctx: Context, channel: SmsOtaChannel, sms: Sms) -> str:
    """A PoR from a phone → the order's next step. Anything else is not ours (yet)."""
    if sms.udh != RESPONSE_UDH:
        return "not a proof of receipt"
    card_serial = ctx.session.scalar(
        select(Card.serial).where(Card.phone == sms.sender, Card.status == "active")
    )
    if card_serial is None:
        return "unknown phone"
    keyset = channel.keyset_for(card_serial)
    try:
        por = decode_por(keyset, SECURITY, sms.udh + sms.user_data)
    except ValueError:
        # A SIM answers a refused packet unsecured (it will not trust that packet's keys):
        # read it so — but only a refusal may come unsecured.
        try:
            por = decode_por(keyset, UNSECURED, sms.udh + sms.user_data)
        except ValueError:
            return "forged or damaged proof of receipt"
        if por.status is PorStatus.OK:
            return "forged or damaged proof of receipt"
    if por.status is not PorStatus.OK:
        # e.g. a duplicated SMS the SIM refused as a replay: nothing ran, nothing changes
        return f"refused by the SIM: {por.status.name}"
    try:
        response = CompactResponse.decode(por.data)
    except ValueError:
        return "forged or damaged proof of receipt"
    return topups.on_proof_of_receipt(
        ctx, channel, card_serial, por.counter, response.last_response
    )
