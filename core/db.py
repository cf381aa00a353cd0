"""The database: one engine per process, one session per request, in sync or async mode."""

import logging
import selectors
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import Depends
from sqlalchemy import Connection, DateTime, Engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, SQLModel, create_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from core.config import Settings, get_settings

logger = logging.getLogger(__name__)

# Errors that mean "the database cannot be reached right now" rather than "this request is wrong"
# (asyncpg raises the socket's own errors when it cannot connect).
DATABASE_DOWN_ERRORS = (PoolTimeoutError, ConnectionError, TimeoutError, socket.gaierror)


def database_url(raw_url: str) -> URL:
    url = make_url(raw_url)
    # A plain postgresql:// URL means psycopg 3 here, not SQLAlchemy's default psycopg2.
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def is_in_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def engine_options(url: URL, settings: Settings) -> dict[str, Any]:
    """Pool and driver options for this URL; the same settings serve the sync and the async driver."""
    options: dict[str, Any] = {"echo": settings.database_echo}
    if is_in_memory(url):
        # Each new connection to ":memory:" would be a new, empty database: share exactly one.
        return options | {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    options |= {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
    }
    if url.get_backend_name() == "sqlite":
        return options | {"connect_args": {"check_same_thread": False}}
    if url.get_driver_name() == "asyncpg":
        connect_args: dict[str, Any] = {"timeout": settings.db_connect_timeout}
        if not settings.db_prepared_statements:
            # PgBouncer hands each transaction any server connection, where a named prepared statement
            # may not exist: with no statement cache, asyncpg and SQLAlchemy use unnamed statements only.
            connect_args |= {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    else:
        connect_args = {"connect_timeout": max(2, round(settings.db_connect_timeout))}
        if not settings.db_prepared_statements:
            connect_args["prepare_threshold"] = None
    return options | {"connect_args": connect_args}


def sqlite_setup(settings: Settings) -> Callable[[Any, Any], None]:
    def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        """Run on every new SQLite connection: these settings last only as long as the connection."""
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={settings.sqlite_busy_timeout_ms:d}")
        # Write-ahead log: readers never wait for the writer. NORMAL syncs the log at checkpoints, not at
        # every commit: an app crash loses nothing, a power cut may lose the last commits (see README).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return configure_sqlite


def rollback_leftover_transaction(dbapi_connection: Any, record: Any, reset: Any) -> None:
    """Run as a connection goes back to the pool: roll back a transaction left open by a failed commit.

    SQLAlchemy 2.1 skips its rollback-on-return once commit() was called, even when the commit failed
    and left the transaction open: the next request would inherit, and could commit, the failed write.
    The rollback is a no-op on a connection with no open transaction.
    """
    if reset.transaction_was_reset and getattr(record.driver_connection, "in_transaction", True):
        dbapi_connection.rollback()


# A connection made or given back this recently, and still open, is not pinged (HikariCP's rule, 500 ms).
PING_AFTER_IDLE_SECONDS = 0.5


def note_time(_dbapi_connection: Any, record: Any) -> None:
    record.info["last_used"] = time.monotonic()


def asyncpg_closed(driver_connection: Any) -> bool:
    # asyncpg keeps reading its socket, so a connection the server closed shows as closed at once.
    return driver_connection.is_closed()


def psycopg_may_be_closed(driver_connection: Any) -> bool:
    if driver_connection.closed:
        return True
    # psycopg reads only when asked. An idle connection has nothing to read unless the server has spoken
    # since, and then it most often said goodbye (a restart, pg_terminate_backend): worth a real ping.
    with selectors.DefaultSelector() as selector:
        selector.register(driver_connection.fileno(), selectors.EVENT_READ)
        return bool(selector.select(timeout=0))


def ping_asyncpg(dbapi_connection: Any) -> None:
    """One simple-protocol SELECT 1: SQLAlchemy's own asyncpg ping takes three round trips (BEGIN, a query,
    ROLLBACK). It prepares no statement, so it is as safe behind PgBouncer."""
    dbapi_connection.run_async(lambda connection: connection.execute("SELECT 1"))


def pre_ping(ping: Callable[[Any], Any], may_be_closed: Callable[[Any], bool]) -> Callable[[Any, Any, Any], None]:
    def ping_unless_just_used(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """Run as a connection leaves the pool: what pool_pre_ping does, with no round trip for a connection
        made or given back moments ago and still open. Under load that is every connection."""
        idle = time.monotonic() - record.info.get("last_used", 0.0)
        if idle < PING_AFTER_IDLE_SECONDS and not may_be_closed(record.driver_connection):
            return
        try:
            ping(dbapi_connection)
        except Exception as exc:
            # As after a failed pre-ping: every pooled connection is presumed dead, and this one is replaced.
            raise InvalidatePoolError("pre-ping failed") from exc

    return ping_unless_just_used


def ping_before_use(engine: Engine, ping: Callable[[Any], Any], may_be_closed: Callable[[Any], bool]) -> None:
    for made_or_returned in ("connect", "checkin"):
        event.listen(engine.pool, made_or_returned, note_time)
    event.listen(engine.pool, "checkout", pre_ping(ping, may_be_closed))


def create_db_engine(settings: Settings) -> Engine | AsyncEngine:
    """The driver in DATABASE_URL chooses the mode: +asyncpg and +aiosqlite give an async engine."""
    url = database_url(settings.database_url)
    options = engine_options(url, settings)
    if url.get_dialect().is_async:
        async_engine = create_async_engine(url, **options)
        sync_engine = async_engine.sync_engine
    else:
        async_engine = None
        sync_engine = create_engine(url, **options)
    # The async engine runs on a sync one underneath, so these listeners serve both modes.
    event.listen(sync_engine.pool, "reset", rollback_leftover_transaction)
    # A pooled connection may have died (database restart, network cut): it is tested before use.
    if url.get_driver_name() == "asyncpg":
        ping_before_use(sync_engine, ping_asyncpg, asyncpg_closed)
    elif url.get_driver_name() == "psycopg":
        ping_before_use(sync_engine, sync_engine.dialect.do_ping, psycopg_may_be_closed)
    if url.get_backend_name() == "sqlite":
        event.listen(sync_engine, "connect", sqlite_setup(settings))
    return async_engine or sync_engine


def sessions_at_once(engine: Engine | AsyncEngine) -> int:
    """How many requests may hold a session at the same time: as many as the pool keeps connections open
    (its overflow ones are closed again after use), and one on SQLite."""
    if engine.dialect.name == "sqlite":
        # SQLite runs inside this process and writes one transaction at a time: more sessions at once only
        # make threads fight for the GIL and writers sleep in SQLite's busy handler (see README, Performance).
        return 1
    return engine.pool.size()  # type: ignore[attr-defined]


engine = create_db_engine(get_settings())
IS_ASYNC = isinstance(engine, AsyncEngine)


def get_session() -> Iterator[Session]:
    """One session per request; closing it rolls back anything uncommitted and returns the connection."""
    # expire_on_commit=False: after commit the objects keep their values, so returning one to the
    # client needs no second SELECT (in async mode such a hidden load would fail: MissingGreenlet).
    with Session(engine, expire_on_commit=False) as session:
        yield session


async def get_async_session() -> AsyncIterator[AsyncSession]:
    """The async twin of get_session: one AsyncSession per request, closed when the request ends."""
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


# A sync request keeps its pooled connection while it waits for a worker thread (to validate the
# response): were every thread waiting for a connection, none would come back, a deadlock. So no more
# requests hold a session than the pool keeps connections (one on SQLite); the others wait in the event
# loop, not in a thread nor in the pool (whose timeout would turn ordinary load into 503s), and no overflow
# connection is opened and closed again for every burst. The overflow stays for the health check and scripts.
SESSIONS_AT_ONCE = sessions_at_once(engine)
SessionDep = Annotated[Session, Depends(get_session, max_concurrency=SESSIONS_AT_ONCE)]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_session, max_concurrency=SESSIONS_AT_ONCE)]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite stores datetimes without an offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value if value.tzinfo is UTC else value.astimezone(UTC)


def create_tables(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Several workers may start at once: one creates the tables while the others wait here.
        connection.execute(text("SELECT pg_advisory_xact_lock(20261125)"))
    SQLModel.metadata.create_all(connection)


async def create_db_and_tables(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as connection:
            await connection.run_sync(create_tables)
    else:
        with engine.begin() as connection:
            create_tables(connection)


async def dispose_engine(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


def select_one() -> None:
    with engine.connect() as connection:  # type: ignore[union-attr]
        connection.execute(text("SELECT 1"))


async def database_is_up() -> bool:
    """Run SELECT 1 on a pooled connection; False (and a log line) when the database cannot answer."""
    try:
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        else:
            await anyio.to_thread.run_sync(select_one)
    except (DBAPIError, *DATABASE_DOWN_ERRORS) as exc:
        logger.warning("Database check failed: %s", type(exc).__name__)
        return False
    return True
