"""``bench.ota`` end to end, small: every party its own process — the phones too, a greenlet
each in theirs (``bench.ota_phones``) — on a scratch PostgreSQL database. ``make bench`` is
not run by CI; this keeps its harness from rotting unseen."""

from __future__ import annotations

import pytest

from bench import ota


@pytest.mark.timeout(180)
def test_the_ota_benchmark_runs_every_party_and_reports_each(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (postgres_url: PostgreSQL is there, or the test is skipped — a failure in CI)
    for name, value in [
        ("phones", 6),
        ("topups_per_phone", 2),
        ("warm_up_topups", 1),
        ("single_phone_topups", 2),
    ]:
        monkeypatch.setattr(ota, name, value)
    figures = ota.ota_figures()
    assert figures["ota_topups_per_s"] > 0 and figures["ota_topup_median_ms_loaded"] > 0
    assert 0 < figures["ota_topup_median_ms"] < ota_phones_wait_ms()
    parties = {*ota.PLATFORM, *ota.SIMULATORS}
    assert {key.removeprefix("cpu_ms_per_topup_") for key in figures if "cpu" in key} == parties
    assert all(figures[f"cpu_ms_per_topup_{party}"] >= 0 for party in parties)
    lines = ota.ota_lines(figures)
    assert [line.split(":")[0] for line in lines] == [
        "ota_topups_per_s",
        "ota_topup_median_ms",
        "ota_topup_median_ms_loaded",
        "pg_commits_per_topup",
        "ota_platform_cpu_ms_per_topup",
        "ota_simulators_cpu_ms_per_topup",
    ]


def ota_phones_wait_ms() -> float:
    from bench.ota_phones import confirmation_wait_s

    return confirmation_wait_s * 1000


def test_the_phones_process_refuses_what_is_not_a_command() -> None:
    """(Else the bench would wait for an answer forever.)"""
    import json
    import subprocess
    import sys

    setup = {"phones": [], "smsc": "http://127.0.0.1:9", "bank": "http://127.0.0.1:9"}
    lines = [json.dumps({**setup, "bank_card": "6222020000000777"}), '{"dance": 1}']
    done = subprocess.run(
        [sys.executable, "-m", "bench.ota_phones"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(done.stdout.splitlines()[0]) == {"ready": 0}
    assert done.returncode != 0 and 'not a command: {"dance": 1}' in done.stderr
