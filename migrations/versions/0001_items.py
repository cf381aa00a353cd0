"""items: the item table, exactly as v1 of the app created it.

Revision ID: 0001
Revises:
Create Date: 2026-12-02 03:15:54
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A database made by v1 (create_all, before migrations) has exactly these tables and columns: the app
# records it as this revision and keeps its rows (core/schema.py, adopt_database_made_before_migrations).
MADE_BEFORE_MIGRATIONS = {"item": {"id", "title", "description", "created_at", "updated_at"}}


def upgrade() -> None:
    op.create_table(
        "item",
        sa.Column("title", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=True),
        # 64-bit on PostgreSQL; on SQLite INTEGER PRIMARY KEY is 64-bit already (and must be spelled so).
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("title", name="uq_item_title"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("item")
