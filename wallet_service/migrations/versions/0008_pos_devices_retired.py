"""a POS device can be retired (taken out of service)

A POS scrapped with its bus, or broken for good, never sends a heartbeat again; settling a
lost card's unproven load waits for every POS to tell it holds the hot list, so one such
device blocked them all for good. A retired device's tokens are revoked, and one retired
before an order was made cannot hold a fare after it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 07:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pos_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retired_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # A retired device brought back could upload fares a settled lost card paid with the
    # load refunded: retirement is for good.
    retired = op.get_bind().execute(
        sa.text("SELECT terminal_id FROM pos_devices WHERE retired_at IS NOT NULL")
    )
    terminals = retired.scalars().all()
    if terminals:
        raise RuntimeError(
            f"POS {', '.join(terminals)} retired: retirement is for good, no downgrade"
        )
    with op.batch_alter_table("pos_devices", schema=None) as batch_op:
        batch_op.drop_column("retired_at")
