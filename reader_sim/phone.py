"""The phone simulator: hosts a SIM, runs its toolkit menu, carries its SMS (OTA issue §3).

The phone is the SIM's terminal, as in ETSI TS 102 223: it sends TERMINAL PROFILE at
power-on, FETCHes each proactive command the SIM announces with `91 xx`, shows it through
its ``Screen`` and answers with TERMINAL RESPONSE; a menu choice goes to the SIM in an
ENVELOPE (MENU SELECTION). SMS from the SMS centre: a command packet (UDH IEI 70) goes to
the SIM in an ENVELOPE (SMS-PP download) and its PoR goes back to the sender (IEI 71);
a text is shown. The passenger's bank app pays the payment links those texts carry.

Two screens: ``ScriptedScreen`` (tests and ``--input``: answers queued in advance, every
screen recorded) and the terminal one in the CLI.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from otar.sms import (
    COMMAND_UDH,
    RESPONSE_UDH,
    decode_sms_submit,
    encode_envelope,
    encode_sms_deliver,
)
from reader_sim.smsc import Outgoing, Sms
from sim_applet.apdu import CommandApdu
from sim_applet.sim import Sim
from sim_applet.stk import (
    INPUT_ALPHABET,
    INPUT_HIDDEN,
    CommandType,
    ProactiveCommand,
    Result,
    StkError,
    TerminalResponse,
    menu_selection,
)

# A terminal profile announcing the commands this phone runs (TS 102 223 §5.2; bytes
# 1–5: download, menu selection, DISPLAY TEXT, GET INPUT, SELECT ITEM, SET UP MENU,
# SEND SHORT MESSAGE). The SIM here does not vary its menu by profile.
TERMINAL_PROFILE = bytes.fromhex("FFFFFFFF1F")
proactive_commands_per_action_max = 32  # a SIM that never stops proposing is cut off
input_attempts_max = 3  # tries at one GET INPUT while the answers fall out of its bounds
_DIGITS = set("0123456789*#+")  # GET INPUT "digits only" (TS 102 223 §6.4.17)
# The platform's texts that end a top-up (wallet_service/services/phone_requests.py and
# topups.py): a scripted phone waiting for its outcome stops at them. A phone knows them
# as a passenger does, from what it is sent; tests/test_phone.py has the platform send
# them, so the two cannot drift apart unnoticed.
PLATFORM_REFUSALS = ("未受理 Refused:", "已退款 Refunded")
_PAYMENT_LINK = re.compile(r"buspay://([A-Za-z0-9_-]+)/([A-Za-z0-9-]+)/([0-9]+)")


class Screen(Protocol):
    def show(self, text: str) -> None: ...

    def ask(self, prompt: str, low: int, high: int, hidden: bool) -> str | None:
        """Digits typed by the passenger, or None for back/cancel."""
        ...

    def choose(self, title: str, items: list[tuple[int, str]]) -> int | None: ...


class SmsLine(Protocol):
    """The phone's radio: send to a number, receive what is waiting (a gateway adapter
    with the phone's own number as its address)."""

    def send(self, to: str, user_data: bytes, udh: bytes = b"") -> None: ...

    def receive(self, wait_ms: int = 0, *, submit: list[Outgoing] | None = None) -> list[Sms]:
        """``submit`` sent first (all or none, up to the SMS centre's batch), then what
        is waiting, up to ``wait_ms`` for the first."""
        ...


@dataclass
class Menu:
    title: str
    items: list[tuple[int, str]]

    def render(self) -> str:
        return self.title + "".join(f"\n{i}. {text}" for i, text in self.items)


@dataclass
class ScriptedScreen:
    """Answers given in advance, in order; every screen kept in ``screens``."""

    answers: list[str] = field(default_factory=list)
    screens: list[str] = field(default_factory=list)

    def show(self, text: str) -> None:
        self.screens.append(text)

    def ask(self, prompt: str, low: int, high: int, hidden: bool) -> str | None:
        self.screens.append(f"{prompt}?")
        return self.answers.pop(0) if self.answers else None

    def choose(self, title: str, items: list[tuple[int, str]]) -> int | None:
        self.screens.append(Menu(title, items).render())
        if not self.answers:
            return None
        answer = self.answers.pop(0)
        return int(answer) if answer.isdigit() else None


class PhoneError(Exception):
    pass


class Phone:
    def __init__(
        self,
        sim: Sim,
        number: str,
        line: SmsLine,
        screen: Screen,
        pay: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.sim, self.number, self.line, self.screen = sim, number, line, screen
        self.pay = pay  # the bank app: (merchant, order id, amount in fen)
        self.menu: Menu | None = None
        self.inbox: list[str] = []
        self.payment_links: list[tuple[str, str, int]] = []

    # --- the toolkit session -------------------------------------------------------------

    def power_on(self) -> None:
        self.sim.power_on()
        self._run(CommandApdu(0x80, 0x10, 0x00, 0x00, TERMINAL_PROFILE).encode())

    def select(self, item_id: int) -> None:
        """The passenger picks a menu item."""
        if self.menu is None:
            raise PhoneError("the SIM has set up no menu")
        if item_id not in {i for i, _ in self.menu.items}:
            raise PhoneError(f"the menu has no item {item_id}")
        self._run(CommandApdu(0x80, 0xC2, 0x00, 0x00, menu_selection(item_id)).encode())

    def _run(self, apdu: bytes) -> None:
        """Send one APDU, then serve proactive commands for as long as the SIM has them."""
        sw = self._transmit(apdu)[-2:]
        for _ in range(proactive_commands_per_action_max):
            if sw[0] != 0x91:
                if sw != b"\x90\x00":
                    raise PhoneError(f"the SIM answered {sw.hex().upper()}")
                return
            fetched = self._transmit(CommandApdu(0x80, 0x12, 0x00, 0x00, b"", sw[1]).encode())
            try:
                command = ProactiveCommand.decode(fetched[:-2])
            except StkError as error:
                raise PhoneError(f"unreadable proactive command: {error}") from None
            answer = self._perform(command)
            sw = self._transmit(CommandApdu(0x80, 0x14, 0x00, 0x00, answer.encode()).encode())[-2:]
        raise PhoneError("the SIM keeps proposing commands")

    def _transmit(self, apdu: bytes) -> bytes:
        answer = self.sim.transmit(apdu)
        if len(answer) < 2:
            raise PhoneError("the SIM did not answer")
        return answer

    def _perform(self, command: ProactiveCommand) -> TerminalResponse:
        kind = command.type
        if kind is CommandType.SET_UP_MENU:
            self.menu = Menu(command.alpha or "", list(command.items))
            return TerminalResponse.for_command(command)
        if kind is CommandType.DISPLAY_TEXT:
            self.screen.show(command.text or "")
            return TerminalResponse.for_command(command)
        if kind is CommandType.GET_INPUT:
            typed = self._get_input(command)
            if typed is None:
                return TerminalResponse.for_command(command, result=Result.BACKWARD_MOVE)
            return TerminalResponse.for_command(command, text=typed)
        if kind is CommandType.SELECT_ITEM:
            chosen = self.screen.choose(command.alpha or "", list(command.items))
            if chosen is None:
                return TerminalResponse.for_command(command, result=Result.BACKWARD_MOVE)
            return TerminalResponse.for_command(command, item_id=chosen)
        return self._send_short_message(command)

    def _get_input(self, command: ProactiveCommand) -> str | None:
        """What the passenger typed, within the command's minimum and maximum length (and
        digits only, unless it allows the alphabet), as a phone's keypad keeps it (TS 102
        223 §6.4.17): an answer out of bounds is not sent; the phone says why and asks
        again. None: back, or no answer in bounds after ``input_attempts_max``."""
        low, high = command.response_length or (0, 255)
        digits_only = not command.qualifier & INPUT_ALPHABET
        hidden = bool(command.qualifier & INPUT_HIDDEN)
        for _ in range(input_attempts_max):
            typed = self.screen.ask(command.text or "", low, high, hidden)
            if typed is None:
                return None
            if low <= len(typed) <= high and (not digits_only or set(typed) <= _DIGITS):
                return typed
            what = "digits" if digits_only else "characters"
            span = f"{low}" if low == high else f"{low} to {high}"
            self.screen.show(f"Enter {span} {what}")
        return None

    def outcome_refused(self) -> str | None:
        """The first SMS from the platform that ended a request or an order, if any."""
        return next((t for t in self.inbox if any(r in t for r in PLATFORM_REFUSALS)), None)

    def _send_short_message(self, command: ProactiveCommand) -> TerminalResponse:
        if command.alpha:
            self.screen.show(command.alpha)
        try:
            submit = decode_sms_submit(command.tpdu or b"")
            self.line.send(submit.destination, submit.user_data)
        except (ValueError, OSError):  # a refused SMS or no radio: "network unable" to the SIM
            return TerminalResponse.for_command(command, result=Result.NETWORK_UNABLE)
        return TerminalResponse.for_command(command)

    # --- SMS ------------------------------------------------------------------------------

    def receive(self, wait_ms: int = 0) -> int:
        """Take what the SMS centre holds for this phone, waiting up to ``wait_ms`` for
        the first; return how many. The SIM's proofs of receipt are sent before this
        returns, each with the phone's next poll: one request, not two (a phone's submit
        and poll cost the SMS centre and the phone as much as each other). While
        ``wait_ms`` lasts, that poll waits on for what the proof answers — the next
        packet of the exchange — and so on while the SIM has proofs to send: a last proof
        that nothing answers keeps this waiting to the end of ``wait_ms``.

        A poll that fails (the SMS centre away: OSError) raises here, its proofs perhaps
        sent, perhaps not — as a send that failed did (the platform asks the SIM again).
        A message whose delivery fails (the bank app's payment, say) raises after the
        proofs of the packets before it are sent: the SIM has run those."""
        deadline = time.monotonic() + wait_ms / 1000
        messages, taken = self.line.receive(wait_ms), 0
        while messages:
            taken += len(messages)
            replies = self._deliver_all(messages)
            if not replies:
                break
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            messages = self.line.receive(left_ms, submit=replies)
        return taken

    def _deliver_all(self, messages: list[Sms]) -> list[Outgoing]:
        """Deliver each; the proofs of receipt to send back. One failing: those of the
        messages before it sent at once (each on its own), and the failure raised."""
        replies: list[Outgoing] = []
        try:
            for sms in messages:
                reply = self._deliver(sms)
                if reply is not None:
                    replies.append(reply)
        except Exception:
            for reply in replies:
                with contextlib.suppress(OSError, ValueError):  # (the first failure tells)
                    self.line.send(*reply)
            raise
        return replies

    def _deliver(self, sms: Sms) -> Outgoing | None:
        """Show a text, or hand a command packet to the SIM: its proof of receipt, if the
        SIM gave one, is what to send back."""
        if sms.udh[1:2] == COMMAND_UDH[1:2]:  # IEI 70: a command packet
            return self._download(sms)
        text = sms.user_data.decode("utf-16-be", errors="replace")
        self.inbox.append(text)
        self.screen.show(f"SMS {sms.sender}: {text}")
        link = _PAYMENT_LINK.search(text)
        if link is not None:
            merchant, order_id, amount = link.group(1), link.group(2), int(link.group(3))
            self.payment_links.append((merchant, order_id, amount))
            if self.pay is not None:
                self.pay(merchant, order_id, amount)
        return None

    def _download(self, sms: Sms) -> Outgoing | None:
        """SMS-PP data download: the SIM gets the packet; the PoR, for the sender."""
        tpdu = encode_sms_deliver(sms.sender, sms.user_data)
        answer = self.sim.transmit(encode_envelope(tpdu))
        por = answer[:-2]
        if len(answer) >= 2 and por[:3] == RESPONSE_UDH:
            return (sms.sender, por[3:], RESPONSE_UDH)
        return None
