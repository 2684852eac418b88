"""Requests a passenger makes from the phone's SIM menu, arriving as SMS (ota.md §5 step 1):
a top-up or a loss report, each authenticated by the card's load key
(``sim_applet.service_request``). A request whose MAC does not verify, from a phone that
is not the card's, or for a card that is not active changes nothing and gets no answer
beyond the audit log — a forger learns nothing.
"""

from __future__ import annotations

from sim_applet.crypto import Algorithm, diversify
from sim_applet.service_request import RequestInvalid, RequestKind, decode_and_verify, peek_serial
from wallet_service import audit
from wallet_service.errors import Conflict, InvalidInput, NotFound
from wallet_service.services import cards, topups
from wallet_service.services.registry import Context


def handle(
    ctx: Context, channel: topups.OtaChannel, sender: str, user_data: bytes, merchant: str
) -> str:
    try:
        serial = peek_serial(user_data).hex().upper()
    except RequestInvalid as error:
        return f"refused: {error}"
    card = cards.find_card(ctx.session, serial)
    if card is None or card.phone != sender:
        _refused(ctx, serial, sender, "not the card in this phone")
        return "refused: not the card in this phone"
    algorithm = Algorithm.from_name(card.algorithm)
    dlk = diversify(algorithm, ctx.keys.issuer_keys().load, bytes.fromhex(serial))
    try:
        request = decode_and_verify(user_data, algorithm, dlk)
    except RequestInvalid as error:
        _refused(ctx, serial, sender, str(error))
        return f"refused: {error}"
    try:
        if request.kind is RequestKind.TOP_UP:
            order = topups.create_order(ctx, serial, request.request_id, request.amount_fen, sender)
            channel.notify(sender, topups.order_notice(order, merchant))
            return f"order {order.reference}"
        cards.mark_lost(ctx, card, "phone")
        channel.notify(sender, "已挂失 Card reported lost")
        return "reported lost"
    except (InvalidInput, NotFound, Conflict) as error:
        channel.notify(sender, f"未受理 Refused: {error}"[:70])
        return f"refused: {error}"


def _refused(ctx: Context, serial: str, sender: str, reason: str) -> None:
    audit.record(
        ctx.session, "sms", "phone_request.refused", serial, ctx.now, phone=sender, reason=reason
    )
