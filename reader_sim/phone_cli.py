"""``python app.py phone IMAGE``: the phone simulator in a terminal, interactive or scripted.

Scripted (tests, shell scripts): ``--select`` menu items in order, ``--input`` answers to
the SIM's questions (and choices in its sub-menus) in order, ``--follow SECONDS`` keeps
receiving SMS (command packets go to the SIM, PoRs go back, payment links are paid with
``--bank-card``), ``--until TEXT`` stops at the SMS containing TEXT — or at once, exit 1
with the reason, when the platform refuses or refunds or the bank refuses the payment.
Every screen is printed. Interactive: the menu, a number picks an item, ``r`` receives
SMS, ``q`` quits; SMS are received in the background too. The image is saved after every
action.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import click
import requests

from reader_sim.cli import BadInput
from reader_sim.phone import Phone, PhoneError, ScriptedScreen
from sim_applet.image import ImageError
from sim_applet.sim import Sim
from wallet_service.sms_gateway import GatewayError, HttpGateway

receive_wait_ms = 500
request_timeout_s = 10.0


@dataclass
class PrintingScreen(ScriptedScreen):
    def show(self, text: str) -> None:
        super().show(text)
        click.echo(f"[{text}]")

    def ask(self, prompt: str, low: int, high: int, hidden: bool) -> str | None:
        answer = super().ask(prompt, low, high, hidden)
        shown = "(back)" if answer is None else "*" * len(answer) if hidden else answer
        click.echo(f"{prompt}? {shown}")
        return answer

    def choose(self, title: str, items: list[tuple[int, str]]) -> int | None:
        chosen = super().choose(title, items)
        click.echo(self.screens[-1])
        click.echo(f"choice? {'(back)' if chosen is None else chosen}")
        return chosen


class TerminalScreen:
    def show(self, text: str) -> None:
        click.echo(f"[{text}]")

    def ask(self, prompt: str, low: int, high: int, hidden: bool) -> str | None:
        answer = click.prompt(f"{prompt} (empty: back)", default="", hide_input=hidden)
        return answer or None

    def choose(self, title: str, items: list[tuple[int, str]]) -> int | None:
        click.echo(title + "".join(f"\n  {i}. {text}" for i, text in items))
        answer = click.prompt("choice (empty: back)", default="")
        return int(answer) if answer.isdigit() else None


class BankApp:
    """The passenger's bank app: pays a payment link with one bank card; keeps the bank's
    refusals (one line each) for ``--until``."""

    def __init__(self, bank_url: str, card_number: str) -> None:
        self.bank_url, self.card_number = bank_url.rstrip("/"), card_number
        self.refusals: list[str] = []

    def __call__(self, merchant: str, order_id: str, amount_fen: int) -> None:
        answer = requests.post(
            f"{self.bank_url}/api/payments",
            json={
                "merchant": merchant,
                "order_id": order_id,
                "amount_fen": amount_fen,
                "card_number": self.card_number,
            },
            timeout=request_timeout_s,
        )
        outcome = "paid"
        if not answer.ok:
            reason = bank_refusal_reason(answer)
            self.refusals.append(f"the bank refused the payment for {order_id}: {reason}")
            outcome = f"refused: {reason}"
        click.echo(f"[bank app: {amount_fen / 100:.2f} yuan for {order_id} {outcome}]")


def bank_refusal_reason(answer: requests.Response) -> str:
    """The bank's ``{"error": {"code", "message"}}`` as one line; else the HTTP status."""
    try:
        error = answer.json()["error"]
        message = " ".join(str(error["message"]).split())
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status_code}"
    return message or str(error.get("code") or f"HTTP {answer.status_code}")


@click.command()
@click.argument("image")
@click.option("--number", default="13800138000", show_default=True, help="this phone's MSISDN")
@click.option("--smsc", "smsc_url", default="http://127.0.0.1:8070", show_default=True)
@click.option("--bank", "bank_url", default="http://127.0.0.1:8090", show_default=True)
@click.option("--bank-card", help="pay payment links with this bank card (else only show them)")
@click.option("--select", "selections", multiple=True, type=int, help="menu item, in order")
@click.option("--input", "answers", multiple=True, help="an answer to the SIM, in order")
@click.option("--follow", type=click.FloatRange(0), help="receive SMS for this many seconds")
@click.option(
    "--until",
    "until_text",
    help="stop following once an SMS contains this text; a refusal (the platform's or the "
    "bank's) stops at once, exit 1",
)
def phone(
    image: str,
    number: str,
    smsc_url: str,
    bank_url: str,
    bank_card: str | None,
    selections: tuple[int, ...],
    answers: tuple[str, ...],
    follow: float | None,
    until_text: str | None,
) -> None:
    """A phone with the SIM of IMAGE: its menu, its SMS."""
    try:
        sim = Sim.load(image)
    except ImageError as error:
        raise BadInput(str(error)) from None
    lock = threading.Lock()
    scripted = bool(selections or answers or follow is not None)
    screen = PrintingScreen(list(answers)) if scripted else TerminalScreen()
    pay = BankApp(bank_url, bank_card) if bank_card else None
    try:
        line = HttpGateway(smsc_url, number)
    except ValueError as error:  # not an http(s) URL, not a phone number
        raise BadInput(str(error)) from None
    handset = Phone(sim, number, line, screen, pay)
    try:
        handset.power_on()
        if scripted:
            _scripted(handset, pay, sim, image, selections, follow or 0, until_text)
            if until_text and not any(until_text in text for text in handset.inbox):
                raise click.ClickException(f"no SMS with {until_text!r} within {follow} s")
        else:
            _interactive(handset, sim, image, lock)
    except PhoneError as error:
        raise BadInput(str(error)) from None
    except (requests.RequestException, GatewayError) as error:
        raise BadInput(f"cannot reach the SMS centre or the bank: {error}") from None
    finally:
        sim.save(image)


def _scripted(
    handset: Phone,
    bank: BankApp | None,
    sim: Sim,
    image: str,
    selections: tuple[int, ...],
    follow_s: float,
    until_text: str | None,
) -> None:
    assert handset.menu is not None
    click.echo(handset.menu.render())
    for item in selections:
        handset.select(item)
        sim.save(image)
    deadline = time.monotonic() + follow_s
    while time.monotonic() < deadline:
        if handset.receive(min(receive_wait_ms, int((deadline - time.monotonic()) * 1000))):
            sim.save(image)
        if until_text and any(until_text in text for text in handset.inbox):
            return
        if until_text:  # what it waits for will not come: say why, now
            refused = handset.outcome_refused()
            if refused is not None:
                raise click.ClickException(f"the platform refused: {' '.join(refused.split())}")
            if bank is not None and bank.refusals:
                raise click.ClickException(bank.refusals[0])


def _interactive(handset: Phone, sim: Sim, image: str, lock: threading.Lock) -> None:
    stop = threading.Event()

    def receive_in_background() -> None:
        while not stop.is_set():
            try:
                with lock:
                    if handset.receive():
                        sim.save(image)
            except (requests.RequestException, GatewayError, PhoneError) as error:
                click.echo(f"[SMS: {error}]")
            stop.wait(receive_wait_ms / 1000)

    threading.Thread(target=receive_in_background, daemon=True).start()
    try:
        while True:
            assert handset.menu is not None
            click.echo(handset.menu.render())
            choice = click.prompt("item, r = receive SMS, q = quit", default="r")
            if choice == "q":
                return
            with lock:
                try:
                    handset.select(int(choice)) if choice.isdigit() else handset.receive()
                except PhoneError as error:
                    click.echo(f"[{error}]")
                sim.save(image)
    except (click.Abort, EOFError):
        return
    finally:
        stop.set()
