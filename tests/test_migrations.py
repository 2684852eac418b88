"""Schema migrations keep what is stored: run on a database of the previous revision."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, text

from wallet_service.migrate import upgrade


def test_0006_gives_orders_that_sent_packets_the_counter_of_their_latest(tmp_path: Path) -> None:
    """Before 0006 a packet's counter was order id × 1000 + attempt; an order under way
    must go on from its last packet's counter, or the SIM refuses the next as a replay."""
    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url, "0005")
    engine = create_engine(url)
    columns = (
        "reference, card_serial, request_id, phone, amount_fen, state, attempts, "
        "init_attempts, created_at, expires_at"
    )
    with engine.begin() as connection:
        for order_id, attempts in ((7, 2), (8, 0)):
            connection.execute(
                text(
                    f"INSERT INTO topup_orders (id, {columns}) VALUES (:id, :ref, 'C', :ref, "
                    "'13800138000', 100, 'credit_sent', :attempts, 1, '2026-11-25', "
                    "'2026-11-25')"
                ),
                {"id": order_id, "ref": f"C-{order_id}", "attempts": attempts},
            )
    upgrade(url)
    with engine.connect() as connection:
        steps = connection.execute(text("SELECT id, step FROM topup_orders ORDER BY id")).all()
    assert [tuple(row) for row in steps] == [(7, 7002), (8, None)]
    engine.dispose()


def _insert_card(connection, serial: str, phone: str, status: str) -> None:  # type: ignore[no-untyped-def]
    connection.execute(
        text(
            "INSERT INTO cards (serial, iccid, phone, algorithm, status, issued_at, image_file) "
            "VALUES (:serial, :serial, :phone, '3des', :status, '2026-11-30', 'x.json')"
        ),
        {"serial": serial, "phone": phone, "status": status},
    )


def test_0007_refuses_to_run_while_a_phone_has_two_active_cards(tmp_path: Path) -> None:
    """It names them: someone reports all but one lost, then upgrades again."""
    import pytest

    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url, "0006")
    engine = create_engine(url)
    with engine.begin() as connection:
        _insert_card(connection, "A", "13800138000", "active")
        _insert_card(connection, "B", "13800138000", "active")
        _insert_card(connection, "C", "13900139000", "lost")
    with pytest.raises(RuntimeError, match="13800138000"):
        upgrade(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE cards SET status = 'lost' WHERE serial = 'B'"))
    upgrade(url)
    with engine.connect() as connection:
        index = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE name = 'cards_one_active_per_phone'")
        ).scalar_one()
    assert "WHERE status = 'active'" in index
    engine.dispose()


def test_0007_keeps_what_paid_orders_were_paid(tmp_path: Path) -> None:
    """Until 0007 a paid order's amount was what the bank paid."""
    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url, "0006")
    engine = create_engine(url)
    with engine.begin() as connection:
        for reference, payment in (("C-1", "pay_1"), ("C-2", None)):
            connection.execute(
                text(
                    "INSERT INTO topup_orders (reference, card_serial, request_id, phone, "
                    "amount_fen, state, payment_id, attempts, init_attempts, created_at, "
                    "expires_at) VALUES (:ref, 'C', :ref, '13800138000', 2500, 'paid', "
                    ":payment, 0, 0, '2026-11-30', '2026-11-30')"
                ),
                {"ref": reference, "payment": payment},
            )
    upgrade(url)
    with engine.connect() as connection:
        paid = connection.execute(text("SELECT reference, paid_fen FROM topup_orders")).all()
    assert sorted(tuple(row) for row in paid) == [("C-1", 2500), ("C-2", None)]
    engine.dispose()


def _at_head_with(tmp_path: Path, insert: str) -> tuple[str, Engine]:
    """A database at the latest revision, holding what ``insert`` writes."""
    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(insert))
    return url, engine


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    from wallet_service.migrate import alembic_config

    command.downgrade(alembic_config(url), revision)


def test_0007_down_and_up_again_loses_no_refund_due(tmp_path: Path) -> None:
    """Down to 0006, a payment for an unknown order still to be refunded goes back to the
    callbacks' batch (where 0006 refunds it, same key); up again, the schema is whole."""
    url, engine = _at_head_with(
        tmp_path,
        "INSERT INTO bank_webhook_events (id, event_type, payload, received_at, "
        "processed_at, refund_due_at) VALUES ('msg_1', 'payment.succeeded', '{}', "
        "'2026-11-30', '2026-11-30', '2026-11-30')",
    )
    _downgrade(url, "0006")
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT processed_at FROM bank_webhook_events")).scalar_one()
            is None
        )
    upgrade(url)
    with engine.connect() as connection:
        indexes = (
            connection.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'bank_%'")
            )
            .scalars()
            .all()
        )
    assert sorted(indexes) == ["bank_webhook_events_refund_due", "bank_webhook_events_unprocessed"]
    engine.dispose()


def test_0008_will_not_go_down_while_a_pos_is_retired(tmp_path: Path) -> None:
    """Retirement is for good: a device brought back could upload fares paid with a load
    since refunded (settled unproven without waiting for it)."""
    import pytest

    url, engine = _at_head_with(
        tmp_path,
        "INSERT INTO pos_devices (operator_id, vehicle_id, terminal_id, psam_key_version, "
        "retired_at) VALUES (1, 1, '000012000009', 1, '2026-12-01')",
    )
    with pytest.raises(RuntimeError, match="000012000009"):
        _downgrade(url, "0007")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT retired_at FROM pos_devices")).scalar_one()
    engine.dispose()


def test_the_migrations_build_the_schema_the_models_declare(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from wallet_service.db import Base

    url = f"sqlite:///{tmp_path / 'wallet.sqlite'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []
