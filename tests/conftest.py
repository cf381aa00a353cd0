"""Fixtures: every test gets a fresh database and the app on it, with its real sessions and start-up.

The endpoint tests run in every mode: sync and async, on in-memory SQLite always, and on PostgreSQL when
TEST_DATABASE_URL is set (each test then gets a database of its own, dropped afterwards).
"""

import asyncio
import os

# The app's own engine must never touch a real database or create a file during tests: every test
# swaps in an engine on its own database (core.db.engine), and the app's code does the rest.
os.environ["DATABASE_URL"] = "sqlite://"

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core import db
from core.config import Settings
from main import create_app
from tests import live

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")

DRIVERS = {
    ("sync", "sqlite"): "sqlite",
    ("async", "sqlite"): "sqlite+aiosqlite",
    ("sync", "postgresql"): "postgresql+psycopg",
    ("async", "postgresql"): "postgresql+asyncpg",
}
BACKENDS = ["sqlite", "postgresql"] if TEST_DATABASE_URL else ["sqlite"]
MODES = [(mode, backend) for backend in BACKENDS for mode in ("sync", "async")]


def pytest_report_header() -> str:
    where = "in-memory SQLite and PostgreSQL" if TEST_DATABASE_URL else "in-memory SQLite only (no TEST_DATABASE_URL)"
    return f"databases: {where}"


@dataclass
class Database:
    """A fresh database for one test: its URL (with the driver of the mode) and how to drop it."""

    mode: str
    backend: str
    url: str

    @property
    def is_async(self) -> bool:
        return self.mode == "async"


def admin_connection() -> psycopg.Connection:
    return live.admin_connection(str(TEST_DATABASE_URL))


@contextmanager
def new_database(mode: str, backend: str) -> Iterator[Database]:
    """A new, empty database: in-memory for SQLite, created and then dropped for PostgreSQL."""
    driver = DRIVERS[mode, backend]
    if backend == "sqlite":
        yield Database(mode, backend, f"{driver}://")
        return
    name = f"test_{uuid4().hex[:12]}"
    with admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(TEST_DATABASE_URL).set(drivername=driver, database=name)
        yield Database(mode, backend, url.render_as_string(hide_password=False))
    finally:
        with admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def mode_id(param: tuple[str, str]) -> str:
    return "-".join(param)


@pytest.fixture(params=MODES, ids=mode_id)
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    """Every mode this run can test: a test using it runs once for each."""
    with new_database(*request.param) as database:
        yield database


@pytest.fixture(params=MODES, ids=mode_id)
def server_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Like `database`, but SQLite is a file in the test's temporary folder, so a server process can open it."""
    mode, backend = request.param
    if backend == "sqlite":
        yield Database(mode, backend, f"{DRIVERS[mode, backend]}:///{tmp_path / 'items.db'}")
        return
    with new_database(mode, backend) as database:
        yield database


@pytest.fixture
def postgresql_required() -> None:
    if not TEST_DATABASE_URL:
        pytest.skip("set TEST_DATABASE_URL to a PostgreSQL database to run this test")


def sync_engine_of(engine: Engine | AsyncEngine) -> Engine:
    """The engine that events are listened on: an async engine's sync one, or the engine itself."""
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


class PoolWatch:
    """Counts connections checked out of an engine's pool and not yet returned."""

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.checked_out = 0
        pool = sync_engine_of(engine).pool
        event.listen(pool, "checkout", self.on_checkout)
        event.listen(pool, "checkin", self.on_checkin)

    def on_checkout(self, *_: object) -> None:
        self.checked_out += 1

    def on_checkin(self, *_: object) -> None:
        self.checked_out -= 1


@dataclass
class App:
    """The app under test with its database: the client, the engine behind the sessions, the pool watch."""

    client: TestClient
    app: FastAPI
    engine: Engine | AsyncEngine
    pool: PoolWatch
    database: Database

    def run(self, function, *args):  # type: ignore[no-untyped-def]
        """Run an async function on the client's event loop (asyncpg connections belong to one loop)."""
        return self.client.portal.call(function, *args)  # type: ignore[union-attr]

    def count_rows(self, sql: str = "SELECT count(*) FROM item") -> int:
        return self.run(scalar, self.engine, sql)

    def execute(self, sql: str) -> None:
        """Run one statement on the test's database, outside the app, and commit it."""
        self.run(execute, self.engine, sql)


async def scalar(engine: Engine | AsyncEngine, sql: str) -> object:
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as connection:
            return (await connection.execute(text(sql))).scalar()
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


async def execute(engine: Engine | AsyncEngine, sql: str) -> None:
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as connection:
            await connection.execute(text(sql))
    else:
        with engine.begin() as connection:
            connection.execute(text(sql))


def app_for(
    database: Database, start: bool = True, app: FastAPI | None = None, **client_options: object
) -> Iterator[App]:
    """The app in the database's mode, on an engine of that database: its own start-up migrates the database,
    its own sessions serve the requests, and its shutdown disposes the engine (`start=False`: no start-up)."""
    engine = db.create_db_engine(Settings(database_url=database.url))
    app = app or create_app(async_mode=database.is_async)
    pool = PoolWatch(engine)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "engine", engine)
        if not start:
            yield App(TestClient(app, **client_options), app, engine, pool, database)  # type: ignore[arg-type]
            asyncio.run(db.dispose_engine(engine))
            return
        with TestClient(app, **client_options) as client:  # type: ignore[arg-type]
            yield App(client, app, engine, pool, database)


def create(client: TestClient, title: str = "Buy milk", **fields: object) -> dict:
    """Create an item through the API and return it (a 201 is asserted)."""
    response = client.post("/items/", json={"title": title, **fields})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def api(database: Database) -> Iterator[App]:
    """The app in every mode, with a fresh database; server errors come back as 500 responses."""
    yield from app_for(database, raise_server_exceptions=False)


@pytest.fixture
def client(api: App) -> TestClient:
    return api.client
