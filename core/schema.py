"""The schema: Alembic migrations bring the database to the models' revision before the app serves.

The migrations live in migrations/versions; migrations/env.py runs them, for `alembic upgrade head` on the
command line and for the app at start-up alike. This module is what both share, and what the app adds:
the start-up step, and the question /health asks (is the database at the revision the app needs?).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.schema import SchemaItem
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from core.config import Settings

logger = logging.getLogger(__name__)

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"
UPGRADE = "alembic upgrade head"
# One key for every migration run, the app's and the command line's: while one runs, the others wait.
MIGRATION_LOCK = 20261125


class SchemaError(RuntimeError):
    """The database's schema is not one the app can serve from (the message says what to run)."""


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(ALEMBIC_INI)
    # The app is importable already; left on, alembic.ini's `prepend_sys_path = .` (for the command line) would add
    # one more "." to sys.path at every start, and a long sys.path slows every failed import in the process.
    config.set_main_option("prepend_sys_path", "")
    # env.py migrates this connection, inside its transaction, instead of opening one of its own.
    config.attributes["connection"] = connection
    return config


@lru_cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


# --- Shared with migrations/env.py: how Alembic compares and writes, the same for the app and the CLI ---


def render_item(type_: str, item: Any, autogen_context: Any) -> str | bool:
    """Write SQLModel's and our own column types as plain SQLAlchemy types, so a generated script imports only
    `sa` and still runs after the app's code has changed (autogenerate would write `sqlmodel.sql.sqltypes.
    AutoString()` or `core.db.UTCDateTime()`, names the script does not import)."""
    if type_ == "type" and isinstance(item, AutoString):
        return f"sa.String(length={item.length})" if item.length else "sa.String()"
    if type_ == "type" and hasattr(item, "impl_instance"):  # a TypeDecorator: the database sees its impl
        return f"sa.{item.impl_instance!r}"
    return False


def include_object(item: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Compare only what the models declare: other tables in the same database are not ours to drop."""
    return not (type_ == "table" and reflected and compare_to is None)


def migration_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": SQLModel.metadata,
        "compare_type": True,
        "compare_server_default": True,
        "render_item": render_item,
        "include_object": include_object,
        # SQLite cannot ALTER most of a table: batch mode copies it to a new one instead.
        "render_as_batch": dialect_name == "sqlite",
    }


@contextmanager
def migration_transaction(connection: Connection) -> Iterator[None]:
    """One transaction around a whole migration run, and one run at a time across processes.

    PostgreSQL: a transaction-scoped advisory lock, so it also works behind PgBouncer in transaction mode (a
    session-level lock could stay behind on a server connection the app no longer has). SQLite: BEGIN
    IMMEDIATE, the write lock, taken before the DDL (pysqlite would otherwise run each DDL statement outside
    any transaction, and a failed migration would leave half its tables behind).
    """
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table by dropping the old one: with foreign keys on, rows that point at it
        # would be deleted with it (ON DELETE CASCADE). SQLite ignores this pragma inside a transaction.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        with connection.begin():
            if sqlite:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            yield
            if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").all()):
                raise SchemaError(f"The migration left rows that point at nothing: {broken}")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def adopt_database_made_before_migrations(connection: Connection, context: MigrationContext) -> None:
    """A database made by v1 (tables from create_all, no alembic_version) is recorded as the first revision,
    keeping every row. Tables of ours in any other shape are never altered by guesswork."""
    if context.get_current_revision() is not None:
        return
    script = ScriptDirectory.from_config(alembic_config())
    if script.get_base() is None:
        return  # no revisions written yet
    first = script.get_revision(script.get_base())
    made_before: dict[str, set[str]] = first.module.MADE_BEFORE_MIGRATIONS
    inspector = inspect(connection)
    ours = set(SQLModel.metadata.tables) | set(made_before)
    found = {name: {c["name"] for c in inspector.get_columns(name)} for name in inspector.get_table_names()}
    found = {name: columns for name, columns in found.items() if name in ours}
    if not found:
        return  # a new database: the migrations create everything
    if found != made_before:
        raise SchemaError(
            f"The database has tables of this app ({', '.join(sorted(found))}) but no migration history, and they "
            "are not the schema of v1: refusing to change them. Migrate them by hand, or use a new database."
        )
    logger.warning("Adopting a database made before migrations: recorded as revision %s", first.revision)
    context.stamp(script, first.revision)


# --- At start-up ---

# The differences between the models and the database that the last start-up found, for /health.
found_at_start: list[Any] = []


def differences(connection: Connection) -> list[Any]:
    """What autogenerate would put in a new migration: empty when the models and the database agree."""
    options = migration_options(connection.dialect.name)
    context = MigrationContext.configure(connection, opts=options)
    return compare_metadata(context, options["target_metadata"])


def describe(difference: Any) -> str:
    """One of autogenerate's differences in a few words: ("add_column", None, "item", Column("done")) ->
    "add_column item.done"."""
    if isinstance(difference, list):
        return ", ".join(describe(part) for part in difference)
    kind, *details = difference
    names = [detail if isinstance(detail, str) else getattr(detail, "name", None) for detail in details[:3]]
    return f"{kind} {'.'.join(name for name in names if name)}"


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def prepare(connection: Connection, migrate: bool) -> list[Any]:
    """Migrate to the newest revision (or, when migrations are a separate step, insist on it); then return
    any difference left between the models and the database."""
    with migration_transaction(connection):
        if migrate:
            command.upgrade(alembic_config(connection), "head")
        elif (current := current_revision(connection)) != head_revision():
            raise SchemaError(
                f"The database is at revision {current or '<none>'}, the app needs {head_revision()}: run `{UPGRADE}`."
            )
    return differences(connection)


async def prepare_database(engine: Engine | AsyncEngine, settings: Settings) -> None:
    """Before the app serves: bring the database to the models' revision, and say so when they still differ."""
    migrate = settings.db_migrate_on_start
    try:
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as connection:
                left = await connection.run_sync(prepare, migrate)
        else:
            with engine.connect() as connection:
                left = prepare(connection, migrate)
    except SchemaError as refused:
        logger.error("%s", refused)  # one line that says what to do, above the traceback
        raise
    found_at_start.clear()
    found_at_start.extend(left)
    if left:
        logger.error(
            "The models and the database differ, so requests that use the difference will fail: %s. "
            'Add a migration (alembic revision --autogenerate -m "...") and restart.',
            ", ".join(describe(difference) for difference in left),
        )
