"""tags: tag names shared by items, and the item_tag links (deleted with their item or tag).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 03:31:31
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tag",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("id", BIGINT, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_tag_name"),
    )
    op.create_table(
        "item_tag",
        sa.Column("item_id", BIGINT, nullable=False),
        sa.Column("tag_id", BIGINT, nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["item.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tag_id"], ["tag.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("item_id", "tag_id"),
    )
    # The primary key finds an item's tags; this index finds a tag's items (the ?tag= filter, item counts).
    op.create_index("ix_item_tag_tag_id_item_id", "item_tag", ["tag_id", "item_id"])


def downgrade() -> None:
    op.drop_index("ix_item_tag_tag_id_item_id", table_name="item_tag")
    op.drop_table("item_tag")
    op.drop_table("tag")
