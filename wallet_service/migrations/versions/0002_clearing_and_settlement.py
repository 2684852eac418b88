"""clearing and settlement

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 03:31:45.601508
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_clearing_states",
        sa.Column("card_serial", sa.String(length=20), nullable=False),
        sa.Column("last_ctc", sa.Integer(), nullable=False),
        sa.Column("last_balance_after_fen", sa.BigInteger(), nullable=False),
        sa.Column("last_event_at", sa.DateTime(), nullable=False),
        sa.Column("last_terminal_id", sa.String(length=12), nullable=False),
        sa.PrimaryKeyConstraint("card_serial"),
    )
    op.create_table(
        "clearing_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("paid_records", sa.BigInteger(), nullable=False),
        sa.Column("paid_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clearing_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_clearing_runs_business_date"), ["business_date"], unique=False
        )

    op.create_table(
        "clearing_exceptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("card_serial", sa.String(length=20), nullable=False),
        sa.Column("record_id", sa.BigInteger(), nullable=True),
        sa.Column("terminal_id", sa.String(length=12), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["clearing_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clearing_exceptions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_clearing_exceptions_card_serial"), ["card_serial"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_clearing_exceptions_run_id"), ["run_id"], unique=False)

    op.create_table(
        "clearing_totals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("operator_id", sa.Integer(), nullable=False),
        sa.Column("fleet", sa.String(length=16), nullable=False),
        sa.Column("route", sa.String(length=16), nullable=False),
        sa.Column("vehicle", sa.String(length=16), nullable=False),
        sa.Column("driver", sa.String(length=10), nullable=False),
        sa.Column("adjustment", sa.Boolean(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["operator_id"],
            ["operators.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["clearing_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clearing_totals", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_clearing_totals_business_date"), ["business_date"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_clearing_totals_run_id"), ["run_id"], unique=False)

    op.create_table(
        "settlement_statements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("operator_id", sa.Integer(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("gross_fen", sa.BigInteger(), nullable=False),
        sa.Column("adjustments_fen", sa.BigInteger(), nullable=False),
        sa.Column("fee_rate_bp", sa.Integer(), nullable=False),
        sa.Column("fee_fen", sa.BigInteger(), nullable=False),
        sa.Column("net_fen", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["operator_id"],
            ["operators.id"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["clearing_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "operator_id"),
    )
    with op.batch_alter_table("settlement_statements", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_settlement_statements_business_date"), ["business_date"], unique=False
        )

    with op.batch_alter_table("tap_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clearing_run_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("excluded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index(
            batch_op.f("ix_tap_records_clearing_run_id"), ["clearing_run_id"], unique=False
        )
        batch_op.create_foreign_key(
            "tap_records_clearing_run_fk", "clearing_runs", ["clearing_run_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("tap_records", schema=None) as batch_op:
        batch_op.drop_constraint("tap_records_clearing_run_fk", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_tap_records_clearing_run_id"))
        batch_op.drop_column("excluded")
        batch_op.drop_column("clearing_run_id")

    with op.batch_alter_table("settlement_statements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_settlement_statements_business_date"))

    op.drop_table("settlement_statements")
    with op.batch_alter_table("clearing_totals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clearing_totals_run_id"))
        batch_op.drop_index(batch_op.f("ix_clearing_totals_business_date"))

    op.drop_table("clearing_totals")
    with op.batch_alter_table("clearing_exceptions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clearing_exceptions_run_id"))
        batch_op.drop_index(batch_op.f("ix_clearing_exceptions_card_serial"))

    op.drop_table("clearing_exceptions")
    with op.batch_alter_table("clearing_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clearing_runs_business_date"))

    op.drop_table("clearing_runs")
    op.drop_table("card_clearing_states")
