"""one active card per phone; top-up orders keep what the bank paid, and when

A phone's SMS name its card by the phone number: two active cards on one number sent one
card's PoRs to the other's orders. And an order paid a wrong amount kept only the paid
amount (the asked one was overwritten), so reconciliation could not show the mismatch;
and reconciliation took a day's orders by their creation, so one made before midnight and
paid after it showed up as loaded but not paid. Money for an unknown order is refunded in
a step of its own (bank_webhook_events.refund_due_at), not while the callbacks wait.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    shared = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT phone FROM cards WHERE status = 'active' GROUP BY phone HAVING COUNT(*) > 1"
            )
        )
        .scalars()
        .all()
    )
    if shared:
        raise RuntimeError(
            f"phones with more than one active card: {', '.join(shared)} — report all but "
            "one lost (or close them), then upgrade again"
        )
    op.create_index(
        "cards_one_active_per_phone",
        "cards",
        ["phone"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paid_fen", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("paid_at", sa.DateTime(), nullable=True))
    # Until now a paid order's amount was what the bank paid (overwritten on a mismatch);
    # when it was paid was not kept: its creation is the nearest known (reconciliation
    # matches older orders by it, as it did before).
    op.execute(
        "UPDATE topup_orders SET paid_fen = amount_fen, paid_at = created_at "
        "WHERE payment_id IS NOT NULL"
    )
    with op.batch_alter_table("bank_webhook_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refund_due_at", sa.DateTime(), nullable=True))
    for name, column, where in (
        ("bank_webhook_events_unprocessed", "received_at", "processed_at IS NULL"),
        ("bank_webhook_events_refund_due", "refund_due_at", "refund_due_at IS NOT NULL"),
    ):
        op.create_index(
            name,
            "bank_webhook_events",
            [column],
            sqlite_where=sa.text(where),
            postgresql_where=sa.text(where),
        )


def downgrade() -> None:
    # Refunds still due go back to the callbacks' batch, where 0006 refunds an unknown
    # order's payment (same refund key): none is lost.
    op.execute("UPDATE bank_webhook_events SET processed_at = NULL WHERE refund_due_at IS NOT NULL")
    op.drop_index("bank_webhook_events_refund_due", table_name="bank_webhook_events")
    op.drop_index("bank_webhook_events_unprocessed", table_name="bank_webhook_events")
    with op.batch_alter_table("bank_webhook_events", schema=None) as batch_op:
        batch_op.drop_column("refund_due_at")
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.drop_column("paid_at")
        batch_op.drop_column("paid_fen")
    op.drop_index("cards_one_active_per_phone", table_name="cards")
