"""``python app.py clearing schedule``: the daily job clears yesterday at its hour; the
database away at that hour (a restart at night) is asked again a while later, and the job
goes on — one failure used to end it, and no day after it was cleared."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from tests.test_wallet_reports import busy_day
from tests.wallet_fixtures import _make_wallet
from wallet_service import cli
from wallet_service.migrate import upgrade
from wallet_service.models import TapRecord


@pytest.fixture
def scheduled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A day of records waiting (made days ago: yesterday's run takes them), the job's
    database, and its waits recorded instead of slept."""
    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url)
    wallet = _make_wallet(url, "sqlite", tmp_path)
    busy_day(wallet, tmp_path)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("WALLET_INSTANCE_DIR", str(tmp_path / "instance"))
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    yield wallet, waits
    wallet.database.dispose()


def _database_away(failures: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first ``failures`` runs find the database gone; the count of tries so far."""
    clear, tries = cli._clear, [0]

    def flaky(day) -> None:  # type: ignore[no-untyped-def]
        tries[0] += 1
        if tries[0] <= failures:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the server is down"))
        clear(day)

    monkeypatch.setattr(cli, "_clear", flaky)
    return tries


def _uncleared(wallet) -> int:  # type: ignore[no-untyped-def]
    unclaimed = select(func.count()).where(TapRecord.clearing_run_id.is_(None))
    return wallet.database.run(lambda session: session.scalar(unclaimed))


def test_a_run_that_finds_the_database_away_is_tried_again_and_clears_the_day(
    scheduled, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet, waits = scheduled
    tries = _database_away(1, monkeypatch)
    result = CliRunner().invoke(cli.clearing, ["schedule", "--at", "02:00", "--once"])
    assert result.exit_code == 0, result.output
    assert "failed (attempt 1 of 12): the server is down" in result.output
    assert '"paid_records": 9' in result.output
    assert tries[0] == 2 and waits[1:] == [cli.clearing_retry_wait_s]  # (first: until 02:00)
    assert _uncleared(wallet) == 0


def test_a_day_given_up_after_the_last_try_fails_once_and_leaves_the_records(
    scheduled, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet, waits = scheduled
    tries = _database_away(cli.clearing_attempts_max, monkeypatch)
    result = CliRunner().invoke(cli.clearing, ["schedule", "--at", "02:00", "--once"])
    assert result.exit_code == 1
    assert "given up: the next day's run clears its records" in result.output
    assert tries[0] == cli.clearing_attempts_max
    assert waits[1:] == [cli.clearing_retry_wait_s] * (cli.clearing_attempts_max - 1)
    assert _uncleared(wallet) == 9


def test_what_is_not_the_database_ends_the_job(scheduled, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(day) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_clear", broken)
    result = CliRunner().invoke(cli.clearing, ["schedule", "--at", "02:00"])
    assert isinstance(result.exception, RuntimeError)
