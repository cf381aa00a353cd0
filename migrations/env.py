"""Alembic runs this file for every command (`alembic upgrade head`, `alembic check`, ...), and so does the app
at start-up (core/schema.py), handing it a connection of its own.

The database is the app's: DATABASE_URL, read by the app's settings, with the app's engine options.
"""

import asyncio
import logging.config

from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import main  # noqa: F401 - the app imports every feature, so every model is in SQLModel.metadata
from core import schema
from core.config import get_settings
from core.db import create_db_engine, database_url, dispose_engine


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        process_revision_directives=number_the_revision,
        **schema.migration_options(connection.dialect.name),
    )
    # The caller holds the transaction (schema.migration_transaction): Alembic runs inside it.
    schema.adopt_database_made_before_migrations(connection, context.get_context())
    context.run_migrations()


def number_the_revision(migration_context, revision, directives) -> None:  # type: ignore[no-untyped-def]
    """`alembic revision` numbers revisions 0001, 0002, ... and writes no script when nothing changed."""
    script = directives[0]
    autogenerate = getattr(migration_context.config.cmd_opts, "autogenerate", False)
    if autogenerate and script.upgrade_ops.is_empty():
        directives[:] = []
        print("No changes between the models and the database: no revision written.")
        return
    head = ScriptDirectory.from_config(migration_context.config).get_current_head()
    script.rev_id = f"{int(head or 0) + 1:04d}"


def run_migrations_in_one_transaction(connection: Connection) -> None:
    with schema.migration_transaction(connection):
        run_migrations(connection)


async def run_async_migrations(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations_in_one_transaction)


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:  # the app's start-up, inside its own transaction
        run_migrations(connection)
        return
    if context.config.config_file_name is not None:
        logging.config.fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    engine = create_db_engine(get_settings())
    if isinstance(engine, AsyncEngine):
        asyncio.run(run_async_migrations(engine))
    else:
        with engine.connect() as connection:
            run_migrations_in_one_transaction(connection)
    asyncio.run(dispose_engine(engine))


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    url = database_url(get_settings().database_url)
    context.configure(url=url, literal_binds=True, **schema.migration_options(url.get_backend_name()))
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
