"""item count: the number of items, kept exact by triggers, so X-Total-Count reads a few rows, not the table.

X-Total-Count used to count the whole table on every list.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 03:50:00

Triggers count every insert and delete, whoever makes it (the app, a script, psql). On PostgreSQL the count
is spread over 16 rows (slots) and the total is their sum: each connection adds to its own slot, so writers
do not queue on one row's lock until they commit. SQLite writes one transaction at a time: one slot.

On SQLite a table rebuilt by batch mode loses its triggers: a later migration that rebuilds `item` must
create them again (tests/test_items.py::test_the_total_counts_every_insert_and_delete_whoever_makes_them
fails if they are missing at head).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOTS = 16
POSTGRESQL = [
    # One UPDATE per statement, not per row: a bulk insert of a million rows adds a million at once. A
    # connection always uses the same slot, so a transaction never waits for two slots (no deadlock).
    f"""CREATE FUNCTION item_count_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            UPDATE item_count SET items = items + (SELECT count(*) FROM changed_rows)
            WHERE slot = pg_backend_pid() % {SLOTS};
        ELSIF TG_OP = 'DELETE' THEN
            UPDATE item_count SET items = items - (SELECT count(*) FROM changed_rows)
            WHERE slot = pg_backend_pid() % {SLOTS};
        ELSE
            UPDATE item_count SET items = 0;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER item_count_insert AFTER INSERT ON item REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION item_count_changed()""",
    """CREATE TRIGGER item_count_delete AFTER DELETE ON item REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION item_count_changed()""",
    """CREATE TRIGGER item_count_truncate AFTER TRUNCATE ON item
    FOR EACH STATEMENT EXECUTE FUNCTION item_count_changed()""",
]
SQLITE = [
    "CREATE TRIGGER item_count_insert AFTER INSERT ON item BEGIN UPDATE item_count SET items = items + 1; END",
    "CREATE TRIGGER item_count_delete AFTER DELETE ON item BEGIN UPDATE item_count SET items = items - 1; END",
]


def upgrade() -> None:
    op.create_table(
        "item_count",
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("items", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("slot"),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    # Triggers first: on PostgreSQL creating them locks the item table, so no insert slips in between them
    # and the count below (the migration's transaction commits both together).
    for statement in POSTGRESQL if postgresql else SQLITE:
        op.execute(statement)
    op.execute("INSERT INTO item_count (slot, items) SELECT 0, count(*) FROM item")
    if postgresql:
        op.execute(f"INSERT INTO item_count (slot, items) SELECT slot, 0 FROM generate_series(1, {SLOTS - 1}) slot")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger in ("item_count_insert", "item_count_delete", "item_count_truncate"):
            op.execute(f"DROP TRIGGER {trigger} ON item")
        op.execute("DROP FUNCTION item_count_changed()")
    else:
        for trigger in ("item_count_insert", "item_count_delete"):
            op.execute(f"DROP TRIGGER {trigger}")
    op.drop_table("item_count")
