"""core/schema.py and migrations/: the schema is built by the migrations, on both databases, in both modes.

A model changed without a migration fails here; so do a migration that cannot go down and up again, a v1
database that would not be adopted, and a failed migration that would leave anything behind.
"""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    inspect,
    make_url,
    text,
)

from core import db, schema
from core.config import Settings, get_settings
from tests.conftest import App, Database, app_for, create
from tests.live import ROOT, Server

# As v1 stored them: ids from the database (its sequence on PostgreSQL), timestamps in UTC.
V1_ROWS = [{"title": "Buy milk", "description": "Two litres"}, {"title": "Call mum", "description": None}]


def made_by_v1(url: str) -> None:
    """A database as v1 of the app left it: SQLModel's create_all, no alembic_version, and rows."""
    metadata = MetaData()
    item = Table(
        "item",
        metadata,
        Column("title", String(100), nullable=False),
        Column("description", String(1000)),
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("title", name="uq_item_title"),
        sqlite_autoincrement=True,
    )
    engine = create_engine(sync_url(url))
    with engine.begin() as connection:
        metadata.create_all(connection)
        stamp = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
        connection.execute(item.insert(), [row | {"created_at": stamp, "updated_at": stamp} for row in V1_ROWS])
    engine.dispose()


def sync_url(url: str) -> str:
    """The same database through a sync driver, for the test's own look at it."""
    parsed = make_url(url)
    driver = "sqlite" if parsed.get_backend_name() == "sqlite" else "postgresql+psycopg"
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def look(url: str, sql: str) -> list[tuple]:
    engine = create_engine(sync_url(url))
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(text(sql))]
    engine.dispose()
    return rows


def tables(url: str) -> set[str]:
    engine = create_engine(sync_url(url))
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


@pytest.fixture
def alembic_on(server_database: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    """Alembic's own configuration, as `alembic ...` on the command line uses it, with DATABASE_URL set to a
    fresh database (a file on SQLite: each command opens it anew), in every mode."""
    monkeypatch.setenv("DATABASE_URL", server_database.url)
    get_settings.cache_clear()
    yield schema.alembic_config()
    get_settings.cache_clear()


def head() -> str:
    return str(schema.head_revision())


# --- The migrations themselves ---


def test_there_is_one_head_and_the_revisions_are_numbered_in_order() -> None:
    script = ScriptDirectory.from_config(schema.alembic_config())
    revisions = [revision.revision for revision in script.walk_revisions()]

    assert script.get_heads() == [head()]
    assert revisions == [f"{number:04d}" for number in range(len(revisions), 0, -1)]


def test_the_models_match_what_the_migrations_build(alembic_on: Config) -> None:
    command.upgrade(alembic_on, "head")

    # Fails with the list of differences when a model changed and no migration says so.
    command.check(alembic_on)


def test_every_migration_goes_down_and_up_again(alembic_on: Config, server_database: Database) -> None:
    command.upgrade(alembic_on, "head")
    command.downgrade(alembic_on, "base")
    assert tables(server_database.url) <= {"alembic_version", "sqlite_sequence"}

    command.upgrade(alembic_on, "head")

    command.check(alembic_on)
    assert look(server_database.url, "SELECT version_num FROM alembic_version") == [(head(),)]


def test_sqlite_keeps_autoincrement_so_ids_of_deleted_items_are_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # alembic check cannot see this table option: a batch rebuild that dropped it would pass the check above.
    url = f"sqlite:///{tmp_path / 'items.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    command.upgrade(schema.alembic_config(), "head")
    get_settings.cache_clear()

    [(sql,)] = look(url, "SELECT sql FROM sqlite_master WHERE name = 'item'")

    assert "AUTOINCREMENT" in sql


def test_the_alembic_command_line_reads_database_url_like_the_app(server_database: Database) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "DATABASE_URL": server_database.url}

    def alembic(*args: str) -> str:
        done = subprocess.run(
            ["alembic", *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    assert "Running upgrade  -> 0001" in alembic("upgrade", "head")
    assert f"{head()} (head)" in alembic("current")
    assert "No new upgrade operations detected." in alembic("check")
    if head() != "0001":
        assert "Running downgrade" in alembic("downgrade", "-1")
        assert f"{head()} (head)" not in alembic("current")


# --- At start-up: migrate, adopt, refuse ---


def test_the_app_migrates_an_empty_database_at_start(server_database: Database) -> None:
    for api in app_for(server_database):
        create(api.client, "First")

    assert look(server_database.url, "SELECT version_num FROM alembic_version") == [(head(),)]
    assert look(server_database.url, "SELECT title FROM item") == [("First",)]


def test_starting_the_app_again_and_again_in_one_process_leaves_sys_path_as_it_was(database: Database) -> None:
    before = list(sys.path)

    for _ in range(3):
        for api in app_for(database):
            assert api.client.get("/items/").status_code == 200

    assert sys.path == before


def test_a_database_made_by_v1_is_adopted_with_its_rows(server_database: Database) -> None:
    made_by_v1(server_database.url)

    for api in app_for(server_database):
        listed = api.client.get("/items/").json()
        created = create(api.client, "New after the upgrade")

    assert [(item["id"], item["title"], item["description"]) for item in listed] == [
        (1, "Buy milk", "Two litres"),
        (2, "Call mum", None),
    ]
    assert listed[0]["created_at"] == "2026-11-25T09:30:00Z"
    assert (listed[0]["version"], listed[0]["tags"]) == (1, []), "new columns get their defaults"
    assert created["id"] == 3
    assert look(server_database.url, "SELECT version_num FROM alembic_version") == [(head(),)]


def test_tables_of_ours_in_an_unknown_shape_are_never_touched(server_database: Database) -> None:
    engine = create_engine(sync_url(server_database.url))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR(10))"))
        connection.execute(text("INSERT INTO item (id, name) VALUES (1, 'mine')"))
    engine.dispose()

    with pytest.raises(schema.SchemaError, match="no migration history.*refusing to change them"):
        for _ in app_for(server_database):
            pass

    assert look(server_database.url, "SELECT id, name FROM item") == [(1, "mine")]


def test_with_migrations_off_a_database_behind_refuses_to_start_naming_both_revisions(
    server_database: Database,
) -> None:
    made_by_v1(server_database.url)
    engine = create_engine(sync_url(server_database.url))
    with engine.connect() as connection, pytest.raises(schema.SchemaError) as refused:
        schema.prepare(connection, migrate=False)
    engine.dispose()

    assert str(refused.value) == (
        f"The database is at revision <none>, the app needs {head()}: run `alembic upgrade head`."
    )
    assert "alembic_version" not in tables(server_database.url)


def test_a_server_with_migrations_off_on_a_database_behind_exits_with_the_line_that_says_what_to_run(
    server_database: Database,
) -> None:
    made_by_v1(server_database.url)
    server = Server(server_database.url, env={"DB_MIGRATE_ON_START": "false"})
    try:
        exit_code = server.process.wait(timeout=30)
    finally:
        log = server.stop()

    assert exit_code != 0
    line = f"The database is at revision <none>, the app needs {head()}: run `alembic upgrade head`."
    assert line in log.splitlines(), log
    assert "Application startup failed" in log


def test_with_migrations_off_a_database_at_head_starts(server_database: Database) -> None:
    for _ in app_for(server_database):
        pass
    engine = create_engine(sync_url(server_database.url))
    with engine.connect() as connection:
        assert schema.prepare(connection, migrate=False) == []
    engine.dispose()


def test_migrations_off_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_MIGRATE_ON_START", "false")

    assert Settings().db_migrate_on_start is False


# --- A failed migration leaves nothing behind ---


def with_one_more_revision(tmp_path: Path, name: str, upgrade: str) -> Config:
    """Alembic's configuration for a copy of the project's migrations plus one revision whose upgrade() is
    `upgrade` (indented source)."""
    scripts = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", scripts, ignore=shutil.ignore_patterns("__pycache__"))
    number = int(head()) + 1
    (scripts / "versions" / f"{number:04d}_{name}.py").write_text(
        f'revision = "{number:04d}"\ndown_revision = "{head()}"\nbranch_labels = depends_on = None\n'
        f"import sqlalchemy as sa\nfrom alembic import op\n\n\ndef upgrade():\n{upgrade}"
    )
    config = schema.alembic_config()
    config.set_main_option("script_location", str(scripts))
    return config


@pytest.fixture
def failing_revision(tmp_path: Path) -> Config:
    """The project's migrations plus one that creates a table, then fails."""
    return with_one_more_revision(
        tmp_path,
        "fails",
        '    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))\n'
        '    raise RuntimeError("the migration fails half-way")\n',
    )


def test_a_migration_that_fails_half_way_leaves_no_table_and_no_revision_behind(
    server_database: Database, failing_revision: Config
) -> None:
    engine = create_engine(sync_url(server_database.url))
    with engine.connect() as connection:
        failing_revision.attributes["connection"] = connection
        with pytest.raises(RuntimeError, match="half-way"), schema.migration_transaction(connection):
            command.upgrade(failing_revision, "head")
    engine.dispose()

    assert "half_done" not in tables(server_database.url)
    assert "item" not in tables(server_database.url), "the whole run is one transaction"


@pytest.fixture
def rebuilding_revision(tmp_path: Path) -> Config:
    """The project's migrations plus one that rebuilds the item table the way SQLite's batch mode does."""
    return with_one_more_revision(
        tmp_path,
        "rebuild",
        '    with op.batch_alter_table("item", recreate="always", table_kwargs={"sqlite_autoincrement": True}):\n'
        "        pass\n",
    )


def test_a_batch_migration_that_rebuilds_the_item_table_keeps_its_tag_links(
    tmp_path: Path, rebuilding_revision: Config
) -> None:
    # SQLite rebuilds a table by dropping it: with foreign keys on, ON DELETE CASCADE would empty item_tag.
    database = Database("sync", "sqlite", f"sqlite:///{tmp_path / 'items.db'}")
    for api in app_for(database):
        create(api.client, "Tagged", tags=["home", "work"])
    engine = db.create_db_engine(Settings(database_url=database.url))
    with engine.connect() as connection:
        rebuilding_revision.attributes["connection"] = connection
        with schema.migration_transaction(connection):
            command.upgrade(rebuilding_revision, "head")
    engine.dispose()

    assert look(database.url, "SELECT count(*) FROM item_tag") == [(2,)]


# --- Errors tell the truth about a schema behind the models ---


def test_health_reports_a_schema_behind_as_not_ok_while_the_database_answers(api: App) -> None:
    api.execute("DELETE FROM alembic_version")

    response = api.client.get("/health")

    assert response.status_code == 503
    assert (response.json()["status"], response.json()["database"], response.json()["schema"]) == (
        "unavailable",
        "ok",
        "behind",
    )


def test_a_column_the_models_need_and_the_database_lacks_is_a_500_logged_with_the_fix_never_a_503(
    server_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in app_for(server_database):
        pass
    engine = create_engine(sync_url(server_database.url))
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE item DROP COLUMN description"))
    engine.dispose()

    for api in app_for(server_database, raise_server_exceptions=False):
        started = caplog.text
        caplog.clear()
        response = api.client.get("/items/")
        health = api.client.get("/health")

    assert "The models and the database differ" in started and "description" in started
    assert (response.status_code, response.json()) == (500, {"detail": "Internal Server Error"})
    [logged] = [record for record in caplog.records if "schema is behind" in record.getMessage()]
    assert "description" in logged.getMessage() and "alembic upgrade head" in logged.getMessage()
    assert (health.status_code, health.json()["database"], health.json()["schema"]) == (503, "ok", "differs")
