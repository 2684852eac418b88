"""top-up packet counters: each order keeps the counter of its latest packet

Until now a packet's counter was order id × 1000 + attempt, so an order paid after a later
order of the same card had started sent counters the SIM refuses as replays. A new
packet's counter is now one above the highest this card has seen, whichever order (or
rekey) sent it; the orders that already sent packets keep theirs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 11:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("step", sa.BigInteger(), nullable=True))
    # BIGINT before multiplying: on PostgreSQL id * 1000 is an INTEGER and overflows
    op.execute(
        "UPDATE topup_orders SET step = CAST(id AS BIGINT) * 1000 + attempts WHERE attempts > 0"
    )


def downgrade() -> None:
    with op.batch_alter_table("topup_orders", schema=None) as batch_op:
        batch_op.drop_column("step")
