"""The database: one engine per process, one session per request, in sync or async mode."""

import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends
from sqlalchemy import BigInteger, DateTime, Engine, Integer, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from core.config import Settings, get_settings
from core.pool import keep_connections_healthy

# --- The engine: one per process, its pool shared by every request ---


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


def create_db_engine(settings: Settings) -> Engine | AsyncEngine:
    """The driver in DATABASE_URL chooses the mode: +asyncpg and +aiosqlite give an async engine."""
    url = database_url(settings.database_url)
    options = engine_options(url, settings)
    if url.get_dialect().is_async:
        async_engine = create_async_engine(url, **options)
        keep_connections_healthy(async_engine.sync_engine, url, settings)
        return async_engine
    engine = create_engine(url, **options)
    keep_connections_healthy(engine, url, settings)
    return engine


# Everything reads `db.engine` when it runs (sessions, start-up, /health), so tests can swap in their own.
engine = create_db_engine(get_settings())
IS_ASYNC = isinstance(engine, AsyncEngine)


# --- The session: one per request, closed after the response ---


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


# --- The dependency: what a route declares to get its session ---


def sessions_at_once(engine: Engine | AsyncEngine) -> int:
    """How many requests may hold a session at the same time: as many as the pool keeps connections open
    (its overflow ones are closed again after use), and one on SQLite."""
    if engine.dialect.name == "sqlite":
        # SQLite runs inside this process and writes one transaction at a time: more sessions at once only
        # make threads fight for the GIL and writers sleep in SQLite's busy handler (see README, Performance).
        return 1
    return engine.pool.size()  # type: ignore[attr-defined]


# A sync request keeps its pooled connection while it waits for a worker thread (to validate the
# response): were every thread waiting for a connection, none would come back, a deadlock. So no more
# requests hold a session than the pool keeps connections (one on SQLite); the others wait in the event
# loop, not in a thread nor in the pool (whose timeout would turn ordinary load into 503s), and no overflow
# connection is opened and closed again for every burst. The overflow stays for the health check and scripts.
SESSIONS_AT_ONCE = sessions_at_once(engine)
SessionDep = Annotated[Session, Depends(get_session, max_concurrency=SESSIONS_AT_ONCE)]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_session, max_concurrency=SESSIONS_AT_ONCE)]


# --- Shutdown: close every pooled connection before the process exits ---


async def dispose_engine(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


# Errors that mean "the database cannot be reached right now" rather than "this request is wrong"
# (asyncpg raises the socket's own errors when it cannot connect).
DATABASE_DOWN_ERRORS = (PoolTimeoutError, ConnectionError, TimeoutError, socket.gaierror)


# Column types every feature's tables use.

# A 64-bit id on PostgreSQL; SQLite's INTEGER PRIMARY KEY is 64-bit already (and must be spelled so).
BigId = BigInteger().with_variant(Integer(), "sqlite")


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
