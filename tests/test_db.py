"""core/db.py: the session guarantees, the engine options, and the database errors clients see."""

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi import HTTPException
from sqlalchemy import Engine, make_url, text
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool, StaticPool

from core import db, pool
from core.config import Settings
from core.db import AsyncSessionDep, SessionDep, UTCDateTime, create_db_engine, database_url, engine_options
from items.item import Item
from tests.conftest import App, Database, admin_connection, app_for, new_database

# --- The session guarantees: every request returns its connection, and failures leave nothing behind ---


def add_failing_route(api: App) -> None:
    """A route that writes a row, flushes it, then fails: the row must not survive."""

    def fail_after_write(session: SessionDep) -> None:
        session.add(Item(title="half-written"))
        session.flush()
        raise RuntimeError("boom")

    async def fail_after_write_async(session: AsyncSessionDep) -> None:
        session.add(Item(title="half-written"))
        await session.flush()
        raise RuntimeError("boom")

    endpoint = fail_after_write_async if api.database.is_async else fail_after_write
    api.app.add_api_route("/fail-after-write", endpoint, methods=["POST"])


def test_every_outcome_returns_the_connection_to_the_pool(api: App) -> None:
    add_failing_route(api)
    client = api.client
    item_id = client.post("/items/", json={"title": "First"}).json()["id"]
    requests = [
        (lambda: client.get(f"/items/{item_id}"), 200),
        (lambda: client.get("/items/"), 200),
        (lambda: client.get("/items/999999"), 404),
        (lambda: client.post("/items/", json={"title": "First"}), 409),
        (lambda: client.patch(f"/items/{item_id}", json={"title": None}), 422),
        (lambda: client.put("/items/999999", json={"title": "x"}), 404),
        (lambda: client.post("/fail-after-write"), 500),
        (lambda: client.delete(f"/items/{item_id}"), 204),
    ]
    for send, expected_status in requests:
        response = send()
        assert response.status_code == expected_status, response.text
        assert api.pool.checked_out == 0, f"a connection stayed checked out after a {expected_status}"


def test_route_that_raises_returns_generic_500_and_leaves_no_row(api: App) -> None:
    add_failing_route(api)

    response = api.client.post("/fail-after-write")

    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error"}
    assert api.count_rows() == 0


def test_failed_commit_is_never_reported_as_success_and_its_write_never_survives(
    api: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialect = api.engine.dialect

    def commit_fails(_dbapi_connection: object) -> None:
        # As a driver reports it when the database refuses the COMMIT (e.g. SQLite's "database is locked").
        raise dialect.loaded_dbapi.OperationalError("the database refused the commit")

    with monkeypatch.context() as patch:
        patch.setattr(dialect, "do_commit", commit_fails)
        failed = api.client.post("/items/", json={"title": "Never stored"})

    # The database refused: a 503 ("retry later"), and the client never hears of a success.
    assert (failed.status_code, failed.json()) == (503, {"detail": "Database unavailable"})
    assert api.pool.checked_out == 0
    # The next request reuses the pooled connection: it must neither see nor commit the failed write.
    assert api.client.get("/items/").headers["x-total-count"] == "0"
    assert api.client.post("/items/", json={"title": "Stored"}).status_code == 201
    assert [item["title"] for item in api.client.get("/items/").json()] == ["Stored"]


def test_conflict_on_update_rolls_back_every_change_of_that_request(api: App) -> None:
    client = api.client
    client.post("/items/", json={"title": "Taken"})
    item = client.post("/items/", json={"title": "Free", "description": "before"}).json()

    assert client.put(f"/items/{item['id']}", json={"title": "Taken", "description": "after"}).status_code == 409

    assert api.count_rows("SELECT count(*) FROM item WHERE description = 'after'") == 0
    assert api.pool.checked_out == 0


def test_http_exception_in_route_rolls_back_the_session(api: App) -> None:
    def reject_after_write(session: SessionDep) -> None:
        session.add(Item(title="rejected"))
        session.flush()
        raise HTTPException(status_code=400, detail="No")

    async def reject_after_write_async(session: AsyncSessionDep) -> None:
        session.add(Item(title="rejected"))
        await session.flush()
        raise HTTPException(status_code=400, detail="No")

    endpoint = reject_after_write_async if api.database.is_async else reject_after_write
    api.app.add_api_route("/reject", endpoint, methods=["POST"])

    assert api.client.post("/reject").json() == {"detail": "No"}
    assert api.count_rows() == 0
    assert api.pool.checked_out == 0


# --- A database that cannot be reached: 503, never a hang or a traceback ---


@pytest.fixture(params=["sync", "async"])
def postgresql_api(request: pytest.FixtureRequest, postgresql_required: None) -> Iterator[App]:
    """The app on a fresh PostgreSQL database, with a real pool (not the tests' in-memory SQLite)."""
    with new_database(request.param, "postgresql") as database:
        yield from app_for(database, raise_server_exceptions=False)


def wait_until_no_session_of(database: str | None, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    with admin_connection() as admin:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        while admin.execute(query, (database,)).fetchone()[0] and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.05)


class AsyncpgConnection:
    """Stands in for an asyncpg connection, which knows at once when the server has closed it."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def close_from_server(self) -> None:
        self.closed = True


class PsycopgConnection:
    """Stands in for a psycopg connection: a real socket, whose other end plays the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.closed = False

    def fileno(self) -> int:
        return self.client.fileno()

    def close_from_server(self) -> None:
        self.server.close()


class Record:
    """Stands in for the pool's record of a connection: when it was last used, and the driver's connection."""

    def __init__(self, driver_connection: object, used_seconds_ago: float | None) -> None:
        self.driver_connection = driver_connection
        self.info = {} if used_seconds_ago is None else {"last_used": time.monotonic() - used_seconds_ago}


@pytest.fixture
def psycopg_connection() -> Iterator[PsycopgConnection]:
    client, server = socket.socketpair()
    with client, server:
        yield PsycopgConnection(client, server)


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver_connection(request: pytest.FixtureRequest) -> AsyncpgConnection | PsycopgConnection:
    if request.param == "asyncpg":
        return AsyncpgConnection()
    return request.getfixturevalue("psycopg_connection")


def checkout_test(driver_connection: object, ping: Callable[[object], object]) -> Callable[..., None]:
    """The pool's checkout listener for this driver, with `ping` in place of the real one."""
    may_be_closed = (
        pool.asyncpg_closed if isinstance(driver_connection, AsyncpgConnection) else pool.psycopg_may_be_closed
    )
    return pool.pre_ping(ping, may_be_closed)


@pytest.mark.parametrize(
    "used_seconds_ago, closed_by_server, pinged",
    [(0.01, False, False), (0.01, True, True), (2.0, False, True), (None, False, True)],
    ids=["just-used-and-open", "just-used-but-closed", "idle", "never-used"],
)
def test_ping_asks_the_server_only_about_idle_or_closed_connections(
    driver_connection: AsyncpgConnection | PsycopgConnection,
    used_seconds_ago: float | None,
    closed_by_server: bool,
    pinged: bool,
) -> None:
    if closed_by_server:
        driver_connection.close_from_server()
    pings: list[object] = []

    checkout_test(driver_connection, pings.append)(
        "dbapi connection", Record(driver_connection, used_seconds_ago), None
    )

    assert pings == (["dbapi connection"] if pinged else [])


def test_psycopg_connection_it_knows_is_closed_is_pinged(psycopg_connection: PsycopgConnection) -> None:
    psycopg_connection.closed = True
    pings: list[object] = []

    checkout_test(psycopg_connection, pings.append)("dbapi connection", Record(psycopg_connection, 0.01), None)

    assert pings == ["dbapi connection"]


def test_ping_that_fails_invalidates_the_pool(driver_connection: AsyncpgConnection | PsycopgConnection) -> None:
    def dead(_dbapi_connection: object) -> None:
        raise ConnectionResetError

    with pytest.raises(InvalidatePoolError):
        checkout_test(driver_connection, dead)("dbapi connection", Record(driver_connection, 2.0), None)


@pytest.fixture(params=["sync", "async"])
def counted_pings(
    request: pytest.FixtureRequest, postgresql_required: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[App, list[object]]]:
    """The app on PostgreSQL, with every ping its pool sends recorded (and still sent)."""
    pings: list[object] = []
    real_asyncpg_ping, real_psycopg_ping = pool.ping_asyncpg, PGDialect_psycopg.do_ping

    def asyncpg_ping(dbapi_connection: object) -> None:
        pings.append(dbapi_connection)
        real_asyncpg_ping(dbapi_connection)

    def psycopg_ping(dialect: PGDialect_psycopg, dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return real_psycopg_ping(dialect, dbapi_connection)

    monkeypatch.setattr(pool, "ping_asyncpg", asyncpg_ping)
    monkeypatch.setattr(PGDialect_psycopg, "do_ping", psycopg_ping)
    with new_database(request.param, "postgresql") as database:
        for api in app_for(database):
            yield api, pings


def test_only_a_connection_idle_for_a_while_is_pinged(
    counted_pings: tuple[App, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, pings = counted_pings
    # A minute, not half a second, so a slow test machine cannot make a connection count as idle.
    monkeypatch.setattr(pool, "PING_AFTER_IDLE_SECONDS", 60.0)
    for _ in range(3):
        assert api.client.get("/items/").status_code == 200
    assert pings == []  # a connection just made, then just given back, needs no round trip

    monkeypatch.setattr(pool, "PING_AFTER_IDLE_SECONDS", 0.0)
    assert api.client.get("/items/").status_code == 200

    assert len(pings) == 1


def test_shutdown_closes_every_pooled_connection(postgresql_api: App) -> None:
    database = make_url(postgresql_api.database.url).database
    assert postgresql_api.client.get("/items/").status_code == 200
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
    with admin_connection() as admin:
        assert admin.execute(query, (database,)).fetchone()[0] > 0  # type: ignore[index]
        # The app's shutdown (the lifespan's end), while this process, and so any forgotten connection, lives on.
        postgresql_api.client.__exit__(None, None, None)
        wait_until_no_session_of(database)
        assert admin.execute(query, (database,)).fetchone()[0] == 0  # type: ignore[index]


def test_a_pooled_connection_the_server_closed_is_replaced_before_use(
    postgresql_api: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every connection counts as just used: only noticing the server's goodbye can save the next request.
    monkeypatch.setattr(pool, "PING_AFTER_IDLE_SECONDS", 60.0)
    client = postgresql_api.client
    database = make_url(postgresql_api.database.url).database
    assert client.get("/items/").status_code == 200
    assert postgresql_api.pool.checked_out == 0
    # As in a database restart: the server ends every session of this database, pooled ones included.
    with admin_connection() as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        ).fetchall()
    assert ended
    wait_until_no_session_of(database)

    response = client.get("/items/")

    assert response.status_code == 200, response.text


@pytest.fixture(params=["sync", "async"])
def unreachable(request: pytest.FixtureRequest) -> Iterator[App]:
    """The app with its sessions on a PostgreSQL port where nothing listens (connection refused)."""
    driver = "postgresql+asyncpg" if request.param == "async" else "postgresql+psycopg"
    database = Database(request.param, "postgresql", f"{driver}://postgres@127.0.0.1:9/nothing")
    yield from app_for(database, start=False, raise_server_exceptions=False)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/items/", None),
        ("GET", "/items/1", None),
        ("POST", "/items/", {"title": "x"}),
        ("DELETE", "/items/1", None),
    ],
)
def test_item_requests_return_503_when_the_database_is_unreachable(
    unreachable: App, method: str, path: str, body: dict | None
) -> None:
    response = unreachable.client.request(method, path, json=body)

    assert response.status_code == 503
    assert response.json() == {"detail": "Database unavailable"}
    assert unreachable.pool.checked_out == 0


def test_health_reports_ok_with_the_mode_and_dialect_of_the_engine_in_use(api: App) -> None:
    response = api.client.get("/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "schema": "ok",
        "mode": api.database.mode,
        "dialect": api.database.backend,
    }


def test_health_returns_503_when_the_database_is_unreachable(api: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "engine", create_db_engine(Settings(database_url="postgresql://postgres@127.0.0.1:9/none")))

    response = api.client.get("/health")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable" and response.json()["database"] == "unavailable"


# --- Engine options, chosen from the URL ---


@pytest.mark.parametrize(
    "url, driver",
    [
        ("postgresql://u@h/d", "postgresql+psycopg"),
        ("postgres://u@h/d", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg"),
        ("sqlite:///x.db", "sqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite"),
    ],
)
def test_database_url_uses_psycopg_3_for_plain_postgresql(url: str, driver: str) -> None:
    assert database_url(url).drivername == driver


@pytest.mark.parametrize(
    "url, is_async",
    [
        ("sqlite://", False),
        ("sqlite+aiosqlite://", True),
        ("postgresql://u@h/d", False),
        ("postgresql+asyncpg://u@h/d", True),
    ],
)
def test_driver_in_the_url_chooses_the_mode(url: str, is_async: bool) -> None:
    assert isinstance(create_db_engine(Settings(database_url=url)), AsyncEngine) is is_async


def test_postgresql_gets_pool_settings_and_connect_timeout() -> None:
    settings = Settings(db_pool_size=3, db_max_overflow=7, db_pool_timeout=9, db_connect_timeout=4)

    options = engine_options(database_url("postgresql://u@h/d"), settings)

    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (3, 7, 9)
    assert options["connect_args"] == {"connect_timeout": 4}
    assert engine_options(database_url("postgresql+asyncpg://u@h/d"), settings)["connect_args"] == {"timeout": 4}


def test_pool_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "2")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "3")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "4.5")

    engine = create_db_engine(Settings(database_url="postgresql://u@h/d"))

    assert isinstance(engine.pool, QueuePool)
    assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._timeout) == (2, 3, 4.5)


def test_prepared_statements_can_be_turned_off_for_pgbouncer() -> None:
    settings = Settings(db_prepared_statements=False)

    psycopg_args = engine_options(database_url("postgresql://u@h/d"), settings)["connect_args"]
    asyncpg_args = engine_options(database_url("postgresql+asyncpg://u@h/d"), settings)["connect_args"]

    assert psycopg_args["prepare_threshold"] is None
    assert asyncpg_args["statement_cache_size"] == 0 and asyncpg_args["prepared_statement_cache_size"] == 0


def test_in_memory_sqlite_shares_one_connection() -> None:
    assert isinstance(create_db_engine(Settings(database_url="sqlite://")).pool, StaticPool)


@pytest.mark.parametrize(
    "url, sessions",
    [
        ("sqlite://", 1),
        ("sqlite:///items.db", 1),
        ("sqlite+aiosqlite:///items.db", 1),
        ("postgresql://u@h/d", 4),
        ("postgresql+asyncpg://u@h/d", 4),
    ],
)
def test_sqlite_admits_one_session_at_a_time_and_postgresql_one_per_kept_connection(url: str, sessions: int) -> None:
    engine = create_db_engine(Settings(database_url=url, db_pool_size=4))

    assert db.sessions_at_once(engine) == sessions


async def pragmas_of_two_connections(engine: Engine | AsyncEngine) -> list[tuple[object, object]]:
    """Open two connections at once: each must have been configured when it was opened."""
    query = text("SELECT * FROM pragma_foreign_keys, pragma_busy_timeout, pragma_journal_mode, pragma_synchronous")
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as first, engine.connect() as second:
            rows = [tuple((await connection.execute(query)).one()) for connection in (first, second)]
        await engine.dispose()
        return rows
    with engine.connect() as first, engine.connect() as second:
        rows = [tuple(connection.execute(query).one()) for connection in (first, second)]
    engine.dispose()
    return rows


@pytest.mark.parametrize("driver", ["sqlite", "sqlite+aiosqlite"])
def test_every_sqlite_connection_gets_foreign_keys_busy_timeout_and_wal(driver: str, tmp_path: Path) -> None:
    settings = Settings(database_url=f"{driver}:///{tmp_path / 'pragmas.db'}", sqlite_busy_timeout_ms=1234)

    rows = asyncio.run(pragmas_of_two_connections(create_db_engine(settings)))

    # synchronous=1 is NORMAL: with WAL, commits are synced at checkpoints.
    assert rows == [(1, 1234, "wal", 1), (1, 1234, "wal", 1)]


# --- Timestamps ---


@pytest.mark.parametrize(
    "stored",
    [datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))],
    ids=["naive-as-sqlite-returns-it", "with-offset-as-postgresql-may-return-it"],
)
def test_utc_datetime_reads_back_as_aware_utc(stored: datetime) -> None:
    value = UTCDateTime().process_result_value(stored, None)
    assert value == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert value.tzinfo == UTC
