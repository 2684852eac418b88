"""Schema migrations keep what is stored: run on a database of the previous revision."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text

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
