"""Entry point: ``python app.py --help``.

Testers drive the card and the POS (``card …``, ``pos …``); ``demo`` is what ``make run``
shows until the wallet service exists.
"""

from __future__ import annotations

import click

from reader_sim.cli import card, pos


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

if __name__ == "__main__":
    cli()
