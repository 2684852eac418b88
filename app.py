"""Entry point: ``python app.py --help``.

Testers drive the card and the POS (``card …``, ``pos …``); operators run the wallet
service (``serve``, ``db upgrade``, ``admin create-token``); ``demo`` shows a card's day.
"""

from __future__ import annotations

import gc

import click

from reader_sim.cli import bank, card, ota, pos, smsc
from reader_sim.phone_cli import phone
from wallet_service.cli import admin, clearing, db, serve, topups, worker

# Every command here is a long-running party (the service, the worker, the SMS centre,
# the bank) or a short tool. Their objects are mostly freed by reference counting: a
# young-generation collection every 700 allocations (Python's default) found little
# garbage and cost the OTA worker some 6 % of its CPU. So one every 20,000, and what the
# imports made (modules, classes, statements built once: never garbage) is left out of every
# collection. bench.ota, 10 interleaved pairs: worker 2.78 -> 2.61 ms CPU a top-up.
young_collection_allocations = 20_000
gc.freeze()
gc.set_threshold(young_collection_allocations)  # (older generations: as by default)


class Cli(click.Group):
    """An operator's setup mistake — a bad DATABASE_URL or key file, a database that is
    down — ends in one line and exit 1, not a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        from sqlalchemy.exc import OperationalError

        from wallet_service.errors import ConfigurationError

        try:
            return super().invoke(ctx)
        except ConfigurationError as error:
            raise click.ClickException(str(error)) from None
        except OperationalError as error:
            reason = str(error.orig or error).strip().splitlines()[0]
            raise click.ClickException(f"the database is unreachable: {reason}") from None


@click.group(cls=Cli)
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
cli.add_command(topups)
cli.add_command(clearing)
cli.add_command(worker)

if __name__ == "__main__":
    cli()
