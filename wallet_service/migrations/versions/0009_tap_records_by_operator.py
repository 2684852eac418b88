"""a bus company's records, found in id order without reading the others'

The records page (``GET /operators/{op}/records``) and the CSV download read a company's
records after an id, in id order, a batch at a time; without this index each batch could
scan and sort the whole table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:55:00
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("tap_records_by_operator", "tap_records", ["operator_id", "id"])


def downgrade() -> None:
    op.drop_index("tap_records_by_operator", table_name="tap_records")
