"""Change PIN and the PIN prompts on the SIM menu: the card's rule (VERIFY / CHANGE PIN take
2–6 BCD bytes: 4, 6, 8, 10 or 12 digits, card-application.md §2) is the menu's rule; a
PIN that breaks it never reaches the card and the passenger is told why; the phone keeps
a GET INPUT's answer within its minimum and maximum length (TS 102 223 §6.4.17)."""

from __future__ import annotations

import pytest

from sim_applet.apdu import SW, CommandApdu
from sim_applet.personalize import personalize
from sim_applet.stk import CommandType, Result, TerminalResponse
from sim_applet.toolkit import TEXTS, Toolkit, ToolkitSettings
from tests.helpers import purse
from tests.test_phone import SERIAL, phone_with

PIN_RULE = "A PIN is 4, 6, 8, 10 or 12 digits"


def english_sim():  # type: ignore[no-untyped-def]
    return personalize(SERIAL, menu=ToolkitSettings("en"))


@pytest.mark.parametrize("new_pin", ["12345", "1234567"])
def test_an_odd_new_pin_is_refused_on_the_screen(new_pin: str) -> None:
    sim = english_sim()
    phone, screen, _ = phone_with(sim, "123456", new_pin, new_pin)
    phone.select(6)
    assert screen.screens[-1] == PIN_RULE
    assert "New PIN again?" not in screen.screens  # refused at once, not after the repeat
    assert purse(sim).pin == bytes.fromhex("123456")


def test_a_pin_shorter_than_the_input_allows_never_reaches_the_card() -> None:
    sim = english_sim()
    phone, screen, _ = phone_with(sim, "123456", "12", "12")
    phone.select(6)
    assert not any("refused" in text for text in screen.screens)
    assert "Enter 4 to 12 digits" in screen.screens
    assert purse(sim).pin == bytes.fromhex("123456") and purse(sim).pin_tries_left == 3


def test_the_phone_asks_again_for_an_answer_out_of_range() -> None:
    sim = english_sim()
    phone, screen, _ = phone_with(sim, "123456", "12", "2468", "2468")
    phone.select(6)
    assert screen.screens[-1] == "PIN changed" and purse(sim).pin == bytes.fromhex("2468")
    assert screen.screens.count("New PIN (4, 6, 8, 10 or 12 digits)?") == 2


def test_a_bad_pin_for_a_top_up_is_refused_on_the_screen() -> None:
    phone, screen, radio = phone_with(english_sim(), "30", "12345")
    phone.select(4)
    assert screen.screens[-1] == PIN_RULE and radio.sent == []


def test_the_menu_says_the_cards_pin_rule_in_both_languages() -> None:
    assert TEXTS["en"]["new_pin"] == "New PIN (4, 6, 8, 10 or 12 digits)"
    assert "4、6、8、10或12位" in TEXTS["zh"]["new_pin"]
    assert "4、6、8、10或12位" in TEXTS["zh"]["pin_rule"]


def test_the_sim_checks_the_length_itself_whatever_the_terminal_sent() -> None:
    """A terminal that ignores the response length: the SIM still sends the card nothing."""
    sent: list[CommandApdu] = []

    def card(apdu: CommandApdu) -> tuple[bytes, int]:
        sent.append(apdu)
        return b"", SW.OK

    toolkit = Toolkit(ToolkitSettings("en"), card, lambda: None, bytes)
    for typed in ("12", "12345678901234"):
        dialog = toolkit.dialog(6)
        assert dialog is not None
        command = next(dialog)
        for answer in ("123456", typed):
            assert command.type is CommandType.GET_INPUT
            assert command.response_length == (4, 12)
            command = dialog.send(TerminalResponse.for_command(command, text=answer))
        assert command.type is CommandType.DISPLAY_TEXT and command.text == PIN_RULE
        with pytest.raises(StopIteration):
            dialog.send(TerminalResponse.for_command(command, result=Result.OK))
    assert sent == []


def test_a_terminal_response_must_name_the_command_it_answers() -> None:
    """The SIM keeps the pending command's number: a response naming another is refused
    (6A80) and the command stays pending; the right one is taken."""
    from sim_applet.stk import ProactiveCommand

    sim = english_sim()
    sim.power_on()
    sw = sim.transmit(CommandApdu(0x80, 0x10, 0x00, 0x00, bytes.fromhex("FFFFFFFF1F")).encode())
    assert sw[0] == 0x91
    fetch = CommandApdu(0x80, 0x12, 0x00, 0x00, b"", sw[1]).encode()
    menu = ProactiveCommand.decode(sim.transmit(fetch)[:-2])
    assert menu.type is CommandType.SET_UP_MENU
    for number, expected in [(menu.number ^ 0x01, SW.WRONG_DATA), (menu.number, SW.OK)]:
        answer = TerminalResponse(number, menu.type, menu.qualifier, Result.OK).encode()
        status = sim.transmit(CommandApdu(0x80, 0x14, 0x00, 0x00, answer).encode())
        assert int.from_bytes(status[-2:], "big") == expected
        if expected == SW.WRONG_DATA:  # (still pending: fetched again, the same)
            assert ProactiveCommand.decode(sim.transmit(fetch)[:-2]) == menu
