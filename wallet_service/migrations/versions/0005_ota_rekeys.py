"""ota key versions and rekey jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 07:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cards", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ota_key_version", sa.Integer(), nullable=False, server_default="1")
        )
    op.create_table(
        "ota_rekeys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("card_serial", sa.String(length=20), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=False),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("counter_base", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_action_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ota_rekeys", schema=None) as batch_op:
        batch_op.create_index("ix_ota_rekeys_card_serial", ["card_serial"], unique=False)
        batch_op.create_index("ix_ota_rekeys_next_action_at", ["next_action_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ota_rekeys", schema=None) as batch_op:
        batch_op.drop_index("ix_ota_rekeys_next_action_at")
        batch_op.drop_index("ix_ota_rekeys_card_serial")
    op.drop_table("ota_rekeys")
    with op.batch_alter_table("cards", schema=None) as batch_op:
        batch_op.drop_column("ota_key_version")
