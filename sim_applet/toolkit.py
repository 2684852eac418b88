"""The bus card's SIM Toolkit application: the phone's menu (OTA issue §2).

Each menu entry is a dialog written as a generator: it yields a proactive command and is
sent the phone's terminal response, until it returns. Balance and history are read from
the card's own files with the card's own APDUs (GET BALANCE, READ RECORD of SFI 18), so
the menu works offline and shows exactly what a reader would read. The PIN is checked
with VERIFY; requests to the platform go out as SEND SHORT MESSAGE, authenticated by the
card's load key (``service_request``).

Settings (menu language, the platform's number) persist with the card image; a dialog in
progress is volatile, as on a real SIM: a reset ends it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from otar.sms import encode_sms_submit
from sim_applet.apdu import SW, CommandApdu
from sim_applet.crypto import Algorithm
from sim_applet.service_request import RequestKind, ServiceRequest
from sim_applet.stk import (
    DISPLAY_WAIT_FOR_USER,
    INPUT_HIDDEN,
    CommandType,
    ProactiveCommand,
    Result,
    TerminalResponse,
)
from sim_applet.structures import (
    GET_BALANCE,
    SFI_LOG,
    TYPE_CAPP_PURCHASE,
    TYPE_LOAD,
    TYPE_PURCHASE,
    LogRecord,
    bcd_encode,
    change_pin,
    read_record,
    verify_pin,
)

LANGUAGES = ("zh", "en")
DEFAULT_PLATFORM_NUMBER = "10658888"  # the bus company's SMS short code (project demo value)
history_lines_max = 5
log_records_max = 10
topup_yuan_max = 1000  # the card's balance limit, card-application.md §1
# VERIFY / CHANGE PIN take the PIN as 2–6 BCD bytes (card-application.md §2), two digits a
# byte: 4, 6, 8, 10 or 12 digits. GET INPUT can only say 4 to 12; the rest is checked here.
pin_digits_min, pin_digits_max = 4, 12

MENU_ITEMS = ("balance", "topups", "rides", "topup", "loss", "pin", "language")

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Bus card",
        "balance": "Balance",
        "topups": "Recent top-ups",
        "rides": "Recent rides",
        "topup": "Top up over the air",
        "loss": "Report loss",
        "pin": "Change PIN",
        "language": "Language",
        "balance_is": "Balance: {yuan} yuan",
        "no_topups": "No top-ups yet",
        "no_rides": "No rides yet",
        "amount": "Amount in yuan (1-{max})",
        "amount_bad": "Enter 1 to {max} yuan",
        "enter_pin": "Card PIN",
        "pin_wrong": "Wrong PIN, {tries} tries left",
        "pin_blocked": "PIN blocked",
        "card_refused": "The card refused: {sw}",
        "sending": "Sending request",
        "topup_sent": "Top-up of {yuan} yuan requested. Pay when the order arrives.",
        "loss_sent": "Loss report sent",
        "not_sent": "Not sent: no network",
        "old_pin": "Current PIN",
        "new_pin": "New PIN (4, 6, 8, 10 or 12 digits)",
        "pin_rule": "A PIN is 4, 6, 8, 10 or 12 digits",
        "again_pin": "New PIN again",
        "pin_mismatch": "The new PINs differ",
        "pin_changed": "PIN changed",
        "language_set": "Language: English",
    },
    "zh": {
        "title": "公交卡",
        "balance": "余额查询",
        "topups": "充值记录",
        "rides": "乘车记录",
        "topup": "空中充值",
        "loss": "挂失",
        "pin": "修改密码",
        "language": "语言 Language",
        "balance_is": "余额：{yuan}元",
        "no_topups": "暂无充值记录",
        "no_rides": "暂无乘车记录",
        "amount": "充值金额（元，1-{max}）",
        "amount_bad": "请输入1至{max}元",
        "enter_pin": "卡密码",
        "pin_wrong": "密码错误，还可尝试{tries}次",
        "pin_blocked": "密码已锁定",
        "card_refused": "卡片拒绝：{sw}",
        "sending": "正在发送请求",
        "topup_sent": "已申请充值{yuan}元，请在收到订单后付款",
        "loss_sent": "挂失申请已发送",
        "not_sent": "发送失败：无网络",
        "old_pin": "原密码",
        "new_pin": "新密码（4、6、8、10或12位数字）",
        "pin_rule": "密码为4、6、8、10或12位数字",
        "again_pin": "再次输入新密码",
        "pin_mismatch": "两次输入的新密码不一致",
        "pin_changed": "密码已修改",
        "language_set": "语言：中文",
    },
}

Dialog = Generator[ProactiveCommand, TerminalResponse, None]
CardApdu = Callable[[CommandApdu], tuple[bytes, int]]


@dataclass
class ToolkitSettings:
    language: str = "zh"
    platform_number: str = DEFAULT_PLATFORM_NUMBER

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "platform_number": self.platform_number}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolkitSettings:
        settings = cls(str(data["language"]), str(data["platform_number"]))
        if settings.language not in LANGUAGES:
            raise ValueError(f"language is one of {LANGUAGES}")
        encode_sms_submit(settings.platform_number, b"")  # raises when not a number
        return settings


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


class Toolkit:
    """The menu application. ``card`` runs one APDU on the transit application;
    ``purse_state`` gives the card's own counters and keys (same chip, no APDU needed);
    ``random`` makes request ids."""

    def __init__(
        self,
        settings: ToolkitSettings,
        card: CardApdu,
        purse_state: Callable[[], Any],
        random: Callable[[int], bytes],
    ) -> None:
        self.settings = settings
        self.card, self.purse_state, self.random = card, purse_state, random
        self._number = 0

    # --- texts and commands --------------------------------------------------------------

    def text(self, key: str, **values: object) -> str:
        return TEXTS[self.settings.language][key].format(**values)

    def _command(self, kind: CommandType, qualifier: int = 0, **fields: Any) -> ProactiveCommand:
        self._number = self._number % 0xFE + 1  # command numbers 01..FE (TS 102 223 §8.6)
        return ProactiveCommand(self._number, kind, qualifier, **fields)

    def set_up_menu(self) -> ProactiveCommand:
        items = tuple((index, self.text(key)) for index, key in enumerate(MENU_ITEMS, start=1))
        return self._command(CommandType.SET_UP_MENU, alpha=self.text("title"), items=items)

    def _display(self, text: str) -> ProactiveCommand:
        return self._command(CommandType.DISPLAY_TEXT, DISPLAY_WAIT_FOR_USER, text=text)

    def _input(self, prompt: str, low: int, high: int, hidden: bool = False) -> ProactiveCommand:
        qualifier = INPUT_HIDDEN if hidden else 0  # digits only, SMS alphabet
        return self._command(
            CommandType.GET_INPUT, qualifier, text=prompt, response_length=(low, high)
        )

    # --- dialogs -------------------------------------------------------------------------

    def dialog(self, item_id: int) -> Dialog | None:
        """The dialog for a menu item, or None for an item this menu does not have."""
        if not 1 <= item_id <= len(MENU_ITEMS):
            return None
        return getattr(self, f"_dialog_{MENU_ITEMS[item_id - 1]}")()

    def _dialog_balance(self) -> Dialog:
        data, sw = self.card(GET_BALANCE)
        if sw != SW.OK:
            yield self._display(self.text("card_refused", sw=f"{sw:04X}"))
            return
        yield self._display(self.text("balance_is", yuan=yuan(int.from_bytes(data, "big"))))

    def _dialog_topups(self) -> Dialog:
        lines = [
            f"{_date(r)} +{yuan(r.amount)}" for r in self._log() if r.transaction_type == TYPE_LOAD
        ]
        yield self._display("\n".join(lines[:history_lines_max]) or self.text("no_topups"))

    def _dialog_rides(self) -> Dialog:
        rides = (TYPE_PURCHASE, TYPE_CAPP_PURCHASE)
        lines = [
            f"{_date(r)} {_time(r)} -{yuan(r.amount)}"
            for r in self._log()
            if r.transaction_type in rides
        ]
        yield self._display("\n".join(lines[:history_lines_max]) or self.text("no_rides"))

    def _log(self) -> list[LogRecord]:
        records = []
        for number in range(1, log_records_max + 1):
            data, sw = self.card(read_record(SFI_LOG, number))
            if sw != SW.OK:
                break  # 6A 83: no more records
            records.append(LogRecord.decode(data))
        return records

    def _dialog_topup(self) -> Dialog:
        answer = yield self._input(self.text("amount", max=topup_yuan_max), 1, 4)
        if answer.result is not Result.OK:
            return
        amount = int(answer.text) if (answer.text or "").isdigit() else 0
        if not 1 <= amount <= topup_yuan_max:
            yield self._display(self.text("amount_bad", max=topup_yuan_max))
            return
        if not (yield from self._pin_checked()):
            return
        sent = yield from self._send_request(RequestKind.TOP_UP, amount * 100)
        if sent:
            yield self._display(self.text("topup_sent", yuan=f"{amount}.00"))

    def _dialog_loss(self) -> Dialog:
        if not (yield from self._pin_checked()):
            return
        if (yield from self._send_request(RequestKind.LOSS_REPORT, 0)):
            yield self._display(self.text("loss_sent"))

    def _dialog_pin(self) -> Dialog:
        entered = []
        for prompt in ("old_pin", "new_pin", "again_pin"):
            pin = yield from self._pin_input(prompt)
            if pin is None:
                return
            entered.append(pin)
        old, new, again = entered
        if new != again:
            yield self._display(self.text("pin_mismatch"))
            return
        _, sw = self.card(change_pin(bcd_encode(old), bcd_encode(new)))
        yield self._display(self._pin_outcome(sw) or self.text("pin_changed"))

    def _dialog_language(self) -> Dialog:
        items = (("zh", "中文"), ("en", "English"))
        choice = yield self._command(
            CommandType.SELECT_ITEM,
            alpha=self.text("language"),
            items=tuple((index, label) for index, (_, label) in enumerate(items, start=1)),
        )
        if choice.result is not Result.OK or choice.item_id not in (1, 2):
            return
        self.settings.language = items[choice.item_id - 1][0]
        yield self._display(self.text("language_set"))
        yield self.set_up_menu()  # the phone's menu in the new language

    # --- shared steps --------------------------------------------------------------------

    def _pin_input(self, prompt: str) -> Generator[ProactiveCommand, TerminalResponse, str | None]:
        """A PIN typed at ``prompt``; None when the passenger went back, or typed one the
        card would refuse — then told the rule on the screen, and the card sent nothing.
        The terminal should keep to GET INPUT's lengths; the SIM does not count on it."""
        answer = yield self._input(self.text(prompt), pin_digits_min, pin_digits_max, True)
        if answer.result is not Result.OK:
            return None
        if not _is_pin(answer.text):
            yield self._display(self.text("pin_rule"))
            return None
        return answer.text

    def _pin_checked(self) -> Generator[ProactiveCommand, TerminalResponse, bool]:
        pin = yield from self._pin_input("enter_pin")
        if pin is None:
            return False
        _, sw = self.card(verify_pin(bcd_encode(pin)))
        refusal = self._pin_outcome(sw)
        if refusal:
            yield self._display(refusal)
            return False
        return True

    def _pin_outcome(self, sw: int) -> str | None:
        if sw == SW.OK:
            return None
        if sw & 0xFFF0 == 0x63C0:
            return self.text("pin_wrong", tries=sw & 0x0F)
        if sw == SW.PIN_BLOCKED:
            return self.text("pin_blocked")
        return self.text("card_refused", sw=f"{sw:04X}")

    def _send_request(
        self, kind: RequestKind, amount_fen: int
    ) -> Generator[ProactiveCommand, TerminalResponse, bool]:
        state = self.purse_state()
        request = ServiceRequest(
            kind, state.serial, amount_fen, self.random(4), state.online_ctc
        ).encode(Algorithm(state.keys.algorithm), state.keys.dlk)
        tpdu = encode_sms_submit(self.settings.platform_number, request)
        answer = yield self._command(
            CommandType.SEND_SHORT_MESSAGE, alpha=self.text("sending"), tpdu=tpdu
        )
        if answer.result is not Result.OK:
            yield self._display(self.text("not_sent"))
            return False
        return True


def _is_pin(text: str | None) -> bool:
    return (
        text is not None
        and text.isascii()
        and text.isdigit()
        and pin_digits_min <= len(text) <= pin_digits_max
        and len(text) % 2 == 0
    )


def _date(record: LogRecord) -> str:
    digits = record.date_bcd.hex()
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"


def _time(record: LogRecord) -> str:
    digits = record.time_bcd.hex()
    return f"{digits[:2]}:{digits[2:4]}"
