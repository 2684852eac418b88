"""topup orders

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 03:58:02.793355
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "topup_orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=40), nullable=False),
        sa.Column("card_serial", sa.String(length=20), nullable=False),
        sa.Column("request_id", sa.String(length=8), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("payment_id", sa.String(length=40), nullable=True),
        sa.Column("online_ctc", sa.Integer(), nullable=True),
        sa.Column("old_balance_fen", sa.BigInteger(), nullable=True),
        sa.Column("card_random", sa.String(length=8), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=True),
        sa.Column("algorithm", sa.Integer(), nullable=True),
        sa.Column("date_bcd", sa.String(length=8), nullable=True),
        sa.Column("time_bcd", sa.String(length=6), nullable=True),
        sa.Column("tac", sa.String(length=8), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("init_attempts", sa.Integer(), nullable=False),
        sa.Column("next_action_at", sa.DateTime(), nullable=True),
        sa.Column("failure", sa.String(length=80), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint("amount_fen > 0", name="topup_amount_positive"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("card_serial", "request_id", name="one_order_per_request"),
        sa.UniqueConstraint("reference"),
    )
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_topup_orders_card_serial"), ["card_serial"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_topup_orders_next_action_at"), ["next_action_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_topup_orders_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_topup_orders_state"))
        batch_op.drop_index(batch_op.f("ix_topup_orders_next_action_at"))
        batch_op.drop_index(batch_op.f("ix_topup_orders_card_serial"))

    op.drop_table("topup_orders")
