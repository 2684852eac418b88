"""``python app.py clearing schedule``: the daily job clears yesterday at its hour; the
database away at that hour (a restart at night) is asked again a while later, a day still
not cleared waits for the next run and is cleared first, under its own date, and the job
goes on — one failure used to end it, and no day after it was cleared. A wrong
configuration or a bug still ends it."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.exc import OperationalError

from tests.test_wallet_reports import busy_day
from tests.wallet_fixtures import _make_wallet
from wallet_service import cli
from wallet_service.migrate import upgrade
from wallet_service.models import ClearingRun

RECORDS_DAY = date(2026, 11, 25)  # busy_day's nine records


class Time:
    """The schedule's clock and sleep: sleeping moves the clock, and the test ends the job
    (``Stop``) at the sleep that begins run ``stop_before_run``."""

    class Stop(Exception):
        pass

    def __init__(self, start: datetime, stop_before_run: int = 99) -> None:
        self.now, self.stop_before_run, self.runs, self.waits = start, stop_before_run, 0, []

    def clock(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds != cli.clearing_retry_wait_s:  # (the wait for the next run)
            self.runs += 1
            if self.runs == self.stop_before_run:
                raise Time.Stop
        self.waits.append(seconds)
        self.now += timedelta(seconds=seconds)


def _refused_connection() -> OperationalError:
    """What SQLAlchemy raises with the database server down: the real thing."""
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/wallet")
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError("something listens on port 1")


@pytest.fixture
def wallet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url)
    wallet = _make_wallet(url, "sqlite", tmp_path)
    busy_day(wallet, tmp_path)
    for variable in ("WALLET_KEY_FILE", "WALLET_PERSONALIZATION_DIR", "PGOPTIONS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("WALLET_INSTANCE_DIR", str(tmp_path / "instance"))
    yield wallet
    wallet.database.dispose()


def _database_away_for(failures: int, monkeypatch: pytest.MonkeyPatch) -> list[date]:
    """The first ``failures`` runs find the database gone; the days asked, in order."""
    clear, asked = cli._clear, []
    refused = _refused_connection()

    def flaky(day: date) -> None:
        asked.append(day)
        if len(asked) <= failures:
            raise refused
        clear(day)

    monkeypatch.setattr(cli, "_clear", flaky)
    return asked


def _runs(wallet) -> list[tuple[date, int]]:  # type: ignore[no-untyped-def]
    query = select(ClearingRun.business_date, ClearingRun.records).order_by(ClearingRun.id)
    return [tuple(row) for row in wallet.database.run(lambda s: s.execute(query).all())]


def test_a_run_that_finds_the_database_away_is_tried_again_and_clears_the_day(
    wallet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _database_away_for(1, monkeypatch)
    time = Time(datetime(2026, 11, 26, 1, 0))
    assert cli.run_schedule(2, 0, True, time.clock, time.sleep)
    assert "failed (attempt 1 of 12): connection failed" in capsys.readouterr().err
    assert time.waits == [3600, cli.clearing_retry_wait_s]
    assert _runs(wallet) == [(RECORDS_DAY, 9)]


def test_a_day_not_cleared_by_its_run_is_cleared_first_at_the_next_under_its_own_date(
    wallet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = _database_away_for(cli.clearing_attempts_max, monkeypatch)
    time = Time(datetime(2026, 11, 26, 1, 0), stop_before_run=3)
    with pytest.raises(Time.Stop):
        cli.run_schedule(2, 0, False, time.clock, time.sleep)
    assert "not cleared: 2026-11-25: tried again at the next run" in capsys.readouterr().err
    next_day = RECORDS_DAY + timedelta(days=1)
    assert asked == [RECORDS_DAY] * cli.clearing_attempts_max + [RECORDS_DAY, next_day]
    assert _runs(wallet) == [(RECORDS_DAY, 9), (next_day, 0)]  # not the next day's, late


def test_once_a_day_not_cleared_exits_1(wallet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    _database_away_for(cli.clearing_attempts_max, monkeypatch)
    result = CliRunner().invoke(cli.clearing, ["schedule", "--at", "02:00", "--once"])
    assert result.exit_code == 1
    assert "not cleared: " in result.output
    assert _runs(wallet) == []


def test_a_wrong_configuration_ends_the_job_at_its_start(
    wallet, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    monkeypatch.setenv("DATABASE_URL", postgres_url.rsplit("/", 1)[0] + "/no_such_database")
    result = CliRunner().invoke(cli.clearing, ["schedule", "--at", "02:00"])
    assert isinstance(result.exception, OperationalError)
    assert "no_such_database" in str(result.exception) and waits == []


def test_what_is_not_the_database_away_ends_the_job(
    wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(day: date) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_clear", broken)
    time = Time(datetime(2026, 11, 26, 1, 0))
    with pytest.raises(RuntimeError):
        cli.run_schedule(2, 0, False, time.clock, time.sleep)


@pytest.mark.parametrize(
    ("sqlstate", "away"),
    [("28P01", False), ("3D000", False), ("57P03", True), (None, True)],
)
def test_what_counts_as_the_database_away(sqlstate: str | None, away: bool) -> None:
    class Orig(Exception):
        pass

    orig = Orig("the server said so")
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    assert cli.database_away(OperationalError("SELECT 1", {}, orig)) is away


def test_a_refused_connection_is_the_database_away() -> None:
    assert cli.database_away(_refused_connection())
