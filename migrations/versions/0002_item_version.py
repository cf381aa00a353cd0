"""item version: a counter for ETags and conditional requests; existing items start at 1.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 03:25:58
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A batch that rebuilds the table on SQLite must keep AUTOINCREMENT (alembic check cannot see it).
KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}


def upgrade() -> None:
    # NOT NULL on a table with rows: the server default fills every existing row with 1.
    with op.batch_alter_table("item", table_kwargs=KEEP_AUTOINCREMENT) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("item", table_kwargs=KEEP_AUTOINCREMENT) as batch_op:
        batch_op.drop_column("version")
