"""Entry point: ``python app.py --help``.

Testers drive the card and the POS (``card …``, ``pos …``); operators run the wallet
service (``serve``, ``db upgrade``, ``admin create-token``); ``demo`` shows a card's day.
"""

from __future__ import annotations

import click

from reader_sim.cli import bank, card, ota, pos, smsc
from reader_sim.phone_cli import phone
from wallet_service.cli import admin, clearing, db, serve, worker


@click.group()
def cli() -> None:
    """Phone-based transit cards: the RFID-SIM e-purse, the bus POS, and their tools."""


@cli.command()
def demo() -> None:
    """A card's day in memory: issue, counter top-up, driver sign-in, taps, tearing."""
    from reader_sim.demo import run_demo

    run_demo(click.echo)


cli.add_command(card)
cli.add_command(pos)
cli.add_command(bank)
cli.add_command(smsc)
cli.add_command(ota)
cli.add_command(phone)
cli.add_command(serve)
cli.add_command(db)
cli.add_command(admin)
cli.add_command(clearing)
cli.add_command(worker)

if __name__ == "__main__":
    cli()
