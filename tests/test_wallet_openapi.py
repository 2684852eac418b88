"""The OpenAPI document matches the API: schemathesis generates requests from it (valid and
invalid) and checks every answer — no server error, documented status codes, bodies that
match their schemas. (Driven through each operation's Hypothesis strategy: schemathesis's
pytest plugin does not run under pytest 9.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.wallet_fixtures import _make_wallet

examples_per_operation = 12


def test_every_operation_answers_as_documented(sqlite_template: Path, tmp_path: Path) -> None:
    path = tmp_path / "wallet.sqlite"
    shutil.copy(sqlite_template, path)
    wallet = _make_wallet(f"sqlite:///{path}", "sqlite", tmp_path)
    wallet.ok("POST", "/api/v1/operators", body={"code": "BUS1", "name": "Bus Co"})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", wallet.app)
    headers = {"Authorization": f"Bearer {wallet.admin_token}"}
    checked = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(
                max_examples=examples_per_operation,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,  # the same examples every run: CI stays deterministic
            )
            def answers_as_documented(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers)

            answers_as_documented()
            checked.append(operation.label)
    finally:
        wallet.database.dispose()
    assert len(checked) >= 20, checked
