"""The RFID-SIM: a card hosting several applications, selected by AID.

``transmit(command) -> response`` is the one door. Nothing raises out of it: a malformed
command answers a status word, and a power cut inside a command (armed by a test with
``cut_power_after``) answers nothing, leaving the card unpowered as a real one is when the
phone leaves the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from sim_applet.apdu import SW, ApduError, CommandApdu, parse_command, response
from sim_applet.nvm import Power, PowerLost
from sim_applet.purse import CardContext, Response
from sim_applet.structures import MF_FID

RandomSource = Callable[[int], bytes]


def _default_atr(historical: bytes = b"RFID-SIM") -> bytes:
    """ATR offering T=1 (ISO 7816-3 §8): TS 3B, T0, TD1 `80` (T=0, TD2 follows),
    TD2 `01` (T=1), historical bytes, TCK = XOR of T0 … last historical byte."""
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes((tck,))


DEFAULT_ATR = _default_atr()
SIM_TOOLKIT_BUSY = 0x9300  # TS 102 221 §10.2.1.3
# Toolkit commands (TS 102 221 §10.1.2): class 80 (or A0 from older phones).
_TOOLKIT_INS = {
    0x10: "_terminal_profile",
    0x12: "_fetch",
    0x14: "_terminal_response",
    0xC2: "_envelope",
}


class Application(Protocol):
    aid: bytes
    fid: int | None
    kind: str

    def reset(self) -> None: ...

    def cancel_transaction(self) -> None:
        """Forget a pending INITIALIZE (and nothing else): any other command ends it."""
        ...

    def select(self) -> Response: ...

    def process(self, apdu: CommandApdu, context: CardContext) -> Response: ...


class Sim:
    def __init__(
        self,
        iccid: str,
        applications: Sequence[Application],
        *,
        random_source: RandomSource = os.urandom,
        atr: bytes = DEFAULT_ATR,
    ) -> None:
        self.iccid = iccid
        self.applications = list(applications)
        self.atr = atr
        self.power = Power()
        self._context = CardContext(self.power, random_source)
        self._powered = True
        self.selected: Application | None = None
        self.commands_processed = 0
        # The OTA security domain (otar.sim_side.OtaSecurityDomain), if personalized with one.
        self.ota: Any = None
        # The phone menu's settings (sim_applet.toolkit.ToolkitSettings), if it has a menu.
        self.toolkit_settings: Any = None
        self._toolkit: Any = None
        self._dialog: Any = None  # the menu dialog in progress (volatile)
        self._proactive: bytes | None = None  # the proactive command waiting for FETCH
        self._proactive_number = 0  # its command number, which its terminal response names
        self._power_cut_plan: tuple[int, int | None] | None = None

    # --- power ---------------------------------------------------------------------------

    @property
    def powered(self) -> bool:
        return self._powered

    def power_on(self) -> bytes:
        self._forget_volatile()
        self._powered = True
        return self.atr

    def power_off(self) -> None:
        self._forget_volatile()
        self._powered = False

    def reset(self) -> bytes:
        return self.power_on()

    def cut_power_after(self, steps: int, *, during_ins: int | None = None) -> None:
        """Arm a power cut right after the ``steps``-th internal step of the next command
        (or of the next command with INS ``during_ins``). A command with fewer steps
        completes and disarms it."""
        assert steps >= 1
        self._power_cut_plan = (steps, during_ins)

    def cancel_power_cut(self) -> None:
        """Disarm a cut that has not happened (its command never came)."""
        self._power_cut_plan = None

    @property
    def last_command_steps(self) -> int:
        return self.power.steps_taken

    def _forget_volatile(self) -> None:
        self.selected = None
        self._dialog, self._proactive = None, None
        for application in self.applications:
            application.reset()

    # --- the door ------------------------------------------------------------------------

    def transmit(self, command: bytes) -> bytes:
        """One C-APDU in, response data ‖ SW out; b"" when the power was cut mid-command."""
        if not self._powered:
            return b""
        self.power.begin_command()
        self.commands_processed += 1
        try:
            apdu = parse_command(command)
            self._arm_power_cut(apdu)
            data, sw = self._dispatch(apdu)
        except ApduError as error:
            # Refused at the SIM's own door (length, SELECT parameters) still counts as
            # "anything but its own completion command" for a pending transaction.
            if self.selected is not None:
                self.selected.cancel_transaction()
            data, sw = b"", error.sw
        except PowerLost:
            self.power_off()
            return b""
        finally:
            self.power.cut_after_steps = None  # an armed cut lasts one command
        return response(data, sw)

    def _arm_power_cut(self, apdu: CommandApdu) -> None:
        plan = self._power_cut_plan
        if plan is not None and plan[1] in (None, apdu.ins):
            self.power.cut_after_steps = plan[0]
            self._power_cut_plan = None

    def _dispatch(self, apdu: CommandApdu) -> Response:
        if (apdu.cla, apdu.ins) == (0x00, 0xA4):
            return self._select(apdu)
        if apdu.cla in (0x80, 0xA0) and apdu.ins in _TOOLKIT_INS:
            return getattr(self, _TOOLKIT_INS[apdu.ins])(apdu)
        if self.selected is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no application selected")
        return self.selected.process(apdu, self._context)

    def _select(self, apdu: CommandApdu) -> Response:
        """SELECT by DF name (P1 04) or by FID (P1 00); P2 00 returns the FCI, 0C nothing."""
        if apdu.p2 not in (0x00, 0x0C):
            raise ApduError(SW.WRONG_P1_P2)
        if apdu.p1 == 0x04:
            found = self._find(lambda app: app.aid == apdu.data)
        elif apdu.p1 == 0x00:
            if len(apdu.data) != 2:
                raise ApduError(SW.WRONG_LENGTH)
            fid = int.from_bytes(apdu.data, "big")
            if fid == MF_FID:
                self._deselect()
                return b"", SW.OK
            found = self._find(lambda app: app.fid == fid)
        else:
            raise ApduError(SW.WRONG_P1_P2)
        if found is None:
            raise ApduError(SW.FILE_NOT_FOUND)
        self._deselect()
        self.selected = found
        fci, sw = found.select()
        return (b"" if apdu.p2 == 0x0C else fci), sw

    def _envelope(self, apdu: CommandApdu) -> Response:
        """ENVELOPE: a menu selection (tag D3) starts a toolkit dialog; an SMS-PP
        download (D1, 3GPP TS 31.111 §7.1.1.2) goes to the OTA security domain, whose
        PoR is the answer."""
        from otar.sms import decode_sms_deliver, sms_tpdu_of_envelope

        if apdu.data[:1] == b"\xd3":
            return self._menu_selection(apdu.data)
        if self.ota is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no OTA security domain")
        try:
            sms = decode_sms_deliver(sms_tpdu_of_envelope(apdu.data))
        except ValueError:
            raise ApduError(SW.WRONG_DATA, "not an SMS-PP download") from None
        if sms.user_data_header[1:2] != b"\x70":
            raise ApduError(SW.WRONG_DATA, "not a command packet (UDH IEI 70)")
        return self.ota.process(sms.user_data, self._run_ota_apdus), SW.OK

    # --- SIM Toolkit (ETSI TS 102 223): the phone's menu ---------------------------------

    def _toolkit_app(self) -> Any:
        if self.toolkit_settings is None:
            raise ApduError(SW.INS_NOT_SUPPORTED, "this SIM has no menu")
        if self._toolkit is None:
            from sim_applet.toolkit import Toolkit

            purse = self.application("transit_purse")
            self._toolkit = Toolkit(
                self.toolkit_settings,
                lambda command: self._run_on(purse, command),
                lambda: purse.state,  # type: ignore[attr-defined]
                self._context.random,
            )
        return self._toolkit

    def _terminal_profile(self, apdu: CommandApdu) -> Response:
        """The phone says what it can do; the SIM answers with its menu to fetch."""
        self._dialog = None
        return self._pending(self._toolkit_app().set_up_menu())

    def _fetch(self, apdu: CommandApdu) -> Response:
        if self._proactive is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no proactive command pending")
        return self._proactive, SW.OK

    def _terminal_response(self, apdu: CommandApdu) -> Response:
        from sim_applet.stk import StkError, TerminalResponse

        if self._proactive is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no proactive command to answer")
        try:
            answer = TerminalResponse.decode(apdu.data)
        except StkError:
            raise ApduError(SW.WRONG_DATA, "not a terminal response") from None
        if answer.number != self._proactive_number:
            raise ApduError(SW.WRONG_DATA, "answers another command")
        self._proactive = None
        if self._dialog is None:
            return b"", SW.OK
        return self._advance(lambda dialog: dialog.send(answer))

    def _menu_selection(self, data: bytes) -> Response:
        from sim_applet.stk import StkError, parse_menu_selection

        toolkit = self._toolkit_app()
        if self._dialog is not None:
            return b"", SIM_TOOLKIT_BUSY
        try:
            dialog = toolkit.dialog(parse_menu_selection(data))
        except StkError:
            raise ApduError(SW.WRONG_DATA, "not a menu selection") from None
        if dialog is None:
            raise ApduError(SW.WRONG_DATA, "no such menu item")
        self._dialog = dialog
        return self._advance(next)

    def _advance(self, step: Callable[[Any], Any]) -> Response:
        try:
            command = step(self._dialog)
        except StopIteration:
            self._dialog = None
            return b"", SW.OK
        return self._pending(command)

    def _pending(self, command: Any) -> Response:
        """`91 xx`: a proactive command (``sim_applet.stk.ProactiveCommand``) of xx bytes
        waits for FETCH (TS 102 221 §10.2). Its number is kept as it is, not decoded again
        from its bytes when its terminal response comes."""
        self._proactive, self._proactive_number = command.encode(), command.number
        return b"", 0x9100 | len(self._proactive)

    def _run_on(self, application: Application, command: CommandApdu) -> tuple[bytes, int]:
        """The toolkit's own APDUs to an application on the same chip, not through the
        phone's channel (the phone's selection stays as it is)."""
        try:
            return application.process(command, self._context)
        except ApduError as error:
            return b"", error.sw

    def _run_ota_apdus(self, tar: bytes, apdus: list[bytes]) -> list[bytes]:
        """Remote APDUs run like the phone's own, on the same applications."""
        answers = []
        for raw in apdus:
            try:
                data, sw = self._dispatch(parse_command(raw))
            except ApduError as error:
                data, sw = b"", error.sw
            answers.append(response(data, sw))
        return answers

    def _deselect(self) -> None:
        if self.selected is not None:
            self.selected.reset()
        self.selected = None

    def _find(self, matches: Callable[[Application], bool]) -> Application | None:
        return next((app for app in self.applications if matches(app)), None)

    def application(self, kind: str) -> Application:
        found = self._find(lambda app: app.kind == kind)
        if found is None:
            raise LookupError(f"this SIM has no {kind} application")
        return found

    # --- the SIM as a file ---------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        from sim_applet.image import write_image

        write_image(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], random_source: RandomSource = os.urandom) -> Sim:
        from sim_applet.image import read_image

        return read_image(Path(path), random_source)
