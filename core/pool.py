"""Pool hygiene: what keeps every pooled connection fit for the next request.

Three guards, registered on the engine by `keep_connections_healthy`: SQLite's per-connection settings, a
rollback of anything a failed commit left open, and a ping (free under load) for connections that may have died.
"""

import selectors
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import InvalidatePoolError

from core.config import Settings


def sqlite_setup(settings: Settings) -> Callable[[Any, Any], None]:
    def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        """Run on every new SQLite connection: these settings last only as long as the connection."""
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={settings.sqlite_busy_timeout_ms:d}")
        # Write-ahead log: readers never wait for the writer. NORMAL syncs the log at checkpoints, not at
        # every commit: an app crash loses nothing, a power cut may lose the last commits (docs/performance.md).
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


def keep_connections_healthy(engine: Engine, url: URL, settings: Settings) -> None:
    """Register the guards on a sync engine (an async engine runs on one underneath, so they serve both modes)."""
    event.listen(engine.pool, "reset", rollback_leftover_transaction)
    # A pooled connection may have died (database restart, network cut): it is tested before use.
    if url.get_driver_name() == "asyncpg":
        ping_before_use(engine, ping_asyncpg, asyncpg_closed)
    elif url.get_driver_name() == "psycopg":
        ping_before_use(engine, engine.dialect.do_ping, psycopg_may_be_closed)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", sqlite_setup(settings))
