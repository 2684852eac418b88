"""Project-wide test configuration.

Under REQUIRE_PCSC=1 (set by .ci/run) a test skipped for want of the PC/SC stack or of
PostgreSQL fails instead: CI must never pass by skipping them.
"""

from __future__ import annotations

import os

import pytest

from tests.pcsc_support import insert_card, pcsc_daemon  # noqa: F401  (fixtures)

_MUST_NOT_SKIP = ("pc/sc", "pcsc", "postgresql", "pyscard")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("REQUIRE_PCSC") != "1" or not report.skipped:
        return
    reason = str(report.longrepr).lower()
    if any(word in reason for word in _MUST_NOT_SKIP):
        report.outcome = "failed"
        report.longrepr = f"skipped, but CI requires it (REQUIRE_PCSC=1): {report.longrepr}"
