"""The docs cannot drift from the code: every command and response in README.md and WORKSHOP.md is checked here.

The convention, for whoever writes these documents (machinery: tests/docs_check.py; to see what a document's
commands print today, run `python -m tests.docs_check WORKSHOP.md`, add `--postgresql` for its PostgreSQL steps):

- ```console blocks: a line starting with `$ ` is a command; lines starting with `> ` right after it continue
  it (as bash shows a heredoc); the lines up to the next `$ ` are what it prints. ```bash (sh, shell) blocks
  hold commands only, one per line: they are run the same way, their output is not compared.
- Each document runs top to bottom in a fresh copy of the repository (so `./items.db` starts empty and ids
  start at 1), a git repository whose one commit holds its files, like a fresh clone (`git diff` shows the
  reader's changes), with bash, the venv's bin first on PATH (`.venv/bin/` also means it), none of the app's
  settings in the environment, and `localhost:8000` / `127.0.0.1:8000` pointing at the test's server. Every
  command must exit 0 within 60 s.
- Output: expected output that is JSON is compared as JSON: field order ignored, a timestamp matches any
  timestamp. Other output line by line: a line that is JSON is compared as JSON; a line that is just `...`
  stands for any number of lines; `...` inside a line for any text; timestamps (ISO 8601, also with a space
  or a comma, and HTTP dates) match any timestamp. Use `curl -s`, or `curl -si` when headers matter.
- `uvicorn main:app` (or `.venv/bin/uvicorn main:app`), alone or after settings (`DATABASE_ECHO=1 ...`;
  names from core/config.py; SQLite URLs as `sqlite[+aiosqlite]:///./NAME.db`), is not run as written: the
  test stops its server and starts this one in the copy, on a free loopback port, access log on; the output
  shown must be how its log begins. It has started when /health answers, 200 or 503 (a server whose models
  and database differ starts, and says so there). A command that talks to port 8000 before any server start
  gets a plain `uvicorn main:app`. Any other way to start a server (`fastapi dev`, `--reload`) fails the test.
- ```server-log blocks: lines that must appear, in order and together, in the running server's log.
- ```diff blocks, as `git diff` prints them (`--- a/main.py`, `+++ b/main.py`), are applied to the copy
  with `git apply`: servers started after them run the patched code.
- PostgreSQL: a block that mentions postgres, createdb, dropdb or psql, or that talks to a server started by
  such a block, runs in a second pass, only when TEST_DATABASE_URL points at postgres@127.0.0.1:5432 (as
  in CI). Databases named by createdb/dropdb or by a server's DATABASE_URL get fresh names, dropped after.
  `alembic revision ...` commands run in that pass too, whatever their block: the migrations they write are
  code that later steps run. There they compare with a scratch SQLite database at the newest revision.
- The test suite command, `python -m pytest` or `.venv/bin/python -m pytest` (.ci/run's), optionally after
  TEST_DATABASE_URL=... and with test files after it (`python -m pytest tests/test_workshop.py`), is never
  run from here; its output may show `...` lines and the `databases:` line, which must be the one
  tests/conftest.py prints for that command.
- Setup commands (`python3 -m venv .venv`, `source .venv/bin/activate`, `pip install -r requirements.txt`,
  also joined with &&) are not run: the tests run in that environment, whose versions must be the pinned
  ones. Show their output as `...` or not at all.
- ```python blocks whose first line is `# path/of/file.py` must appear verbatim in that file (without that
  first line): quoted code cannot drift.
"""

import importlib.util
import re
import shutil
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest
from alembic import command as alembic
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlmodel import SQLModel

from core import schema
from tests import conftest
from tests.conftest import BACKENDS, app_for, new_database
from tests.docs_check import (
    ROOT,
    Block,
    DocRun,
    apply_diff,
    iter_commands,
    kind,
    new_file,
    patched_file,
    postgresql_blocks,
    postgresql_unavailable,
    quoted_code,
    quoted_file,
    read_blocks,
    read_commands,
    same_output,
    server_problems,
    split_environment,
    suite_command,
    write_new_file,
)

DOCUMENTS = ["README.md", "WORKSHOP.md"]
WORKSHOP = ROOT / "WORKSHOP.md"
PROJECTS_LINES = ["from projects import project", "    app.include_router(project.router)"]


def document_path(name: str) -> Path:
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    return path


def passes(name: str) -> list[str]:
    """The runs a document needs: "sqlite" for its steps, "postgresql" for its PostgreSQL steps, if any."""
    path = ROOT / name
    if not path.exists():
        return ["sqlite"]
    blocks = read_blocks(path)
    steps = [needs for block, needs in zip(blocks, postgresql_blocks(blocks)) if read_commands(block)]
    return [run for run, wanted in (("sqlite", False), ("postgresql", True)) if wanted in steps] or ["sqlite"]


# --- Running the documents ---


DOCUMENT_RUNS = [(name, database) for name in DOCUMENTS for database in passes(name)]


@pytest.mark.parametrize(
    "name, database", DOCUMENT_RUNS, ids=[f"{name}-{database}" for name, database in DOCUMENT_RUNS]
)
def test_console_blocks_print_what_the_document_shows(name: str, database: str, tmp_path: Path) -> None:
    document = document_path(name)
    if database == "postgresql" and (reason := postgresql_unavailable()):
        pytest.skip(reason)

    run = DocRun(document, tmp_path, postgresql=database == "postgresql")
    run.run()

    assert run.commands_run > 0, f"{name} has no console commands to run"


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_command_is_run_or_is_one_the_tests_stand_in_for(name: str) -> None:
    problems = []
    for _block, command in iter_commands(document_path(name)):
        what = kind(command.text)
        if what == "server":
            problems += [f"{command.where}: {problem}" for problem in server_problems(command.text)]
        elif what == "suite":
            problems += [
                f"{command.where}: {problem}" for problem in suite_problems(command.text, command.expected or [])
            ]
        elif what == "setup":
            if any(line.strip() not in ("", "...") for line in command.expected or []):
                problems.append(f"{command.where}: show the output of a setup command as `...`, it is not run")
        else:
            hosts = re.findall(r"https?://([^/:\s'\"]+)", command.text)
            problems += [f"{command.where}: {host} is not loopback" for host in hosts if host not in LOOPBACK]
    assert not problems, "\n".join(problems)


LOOPBACK = {"localhost", "127.0.0.1"}


def suite_problems(command: str, expected: list[str]) -> list[str]:
    environment, rest = split_environment(command)
    ci = suite_command()
    problems = []
    files = [word for word in rest.split() if word.startswith("tests/")]
    runner = " ".join(word for word in rest.split() if word not in files)
    if runner not in (ci, ci.removeprefix(".venv/bin/")):
        problems.append(f"run the suite as .ci/run does: `{ci}` (or `python -m pytest` in the activated venv)")
    problems += [f"{file} is not a test file of this repository" for file in files if not (ROOT / file).is_file()]
    if set(environment) - {"TEST_DATABASE_URL"}:
        problems.append("only TEST_DATABASE_URL may be set for the test suite")
    header = report_header("TEST_DATABASE_URL" in environment)
    for line in expected:
        if line.startswith("databases:") and line != header:
            problems.append(f"the suite prints {header!r} here, not {line!r}")
        elif "..." not in line and not line.startswith("databases:"):
            problems.append(f"the suite's output is not checked: show {line!r} as `...`")
    return problems


def report_header(with_postgresql: bool) -> str:
    """The `databases:` line tests/conftest.py prints, with or without TEST_DATABASE_URL."""
    saved = conftest.TEST_DATABASE_URL
    conftest.TEST_DATABASE_URL = "postgresql://set" if with_postgresql else None
    try:
        return conftest.pytest_report_header()
    finally:
        conftest.TEST_DATABASE_URL = saved


def test_the_installed_packages_are_the_versions_requirements_txt_pins() -> None:
    pins = re.findall(r"^([\w.-]+)(?:\[[\w,]+\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pins
    wrong = {name: (pinned, version(name)) for name, pinned in pins if version(name) != pinned}
    assert not wrong, f"installed versions differ from requirements.txt (pinned, installed): {wrong}"


# --- Quoted code ---


def documents_with(kind: str) -> list[str]:
    """The documents that have a ```python block quoting a file, or a ```diff block: a check of none proves nothing."""
    wanted = quoted_file if kind == "python" else (lambda block: block.info == "diff")
    return [name for name in DOCUMENTS if any(wanted(block) for block in read_blocks(ROOT / name))]


@pytest.mark.parametrize("name", documents_with("python"))
def test_python_quoted_from_a_file_appears_verbatim_in_that_file(name: str) -> None:
    problems = []
    quoting = [block for block in read_blocks(document_path(name)) if quoted_file(block)]
    assert quoting
    for block in quoting:
        path = quoted_file(block)
        if not (ROOT / path).is_file():
            problems.append(f"{block.where}: quotes {path}, which does not exist")
        elif quoted_code(block) not in (ROOT / path).read_text():
            problems.append(f"{block.where}: this is no longer what {path} says")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", documents_with("diff"))
def test_diffs_in_the_document_apply_to_the_files_they_patch(name: str, tmp_path: Path) -> None:
    diffs = [block for block in read_blocks(document_path(name)) if block.info == "diff"]
    assert diffs
    for block in diffs:
        target = patched_file(block)
        assert target, f"{block.where}: a diff block needs a `+++ b/FILE` header"
        copy = tmp_path / target
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text((ROOT / target).read_text())
        apply_diff(block, tmp_path)


def test_the_workshop_quotes_the_code_it_explains() -> None:
    quotes = [(quoted_file(block), quoted_code(block)) for block in read_blocks(WORKSHOP) if quoted_file(block)]
    quoted = {path for path, _ in quotes}
    assert {"main.py", "items/item.py", "core/db.py", "tests/conftest.py"} <= quoted
    assert [new_file(block) for block in read_blocks(WORKSHOP) if new_file(block)] == ["projects/project.py"]
    text = "\n".join(code for _, code in quotes)
    twins = ("def create_item(", "async def create_item_async(", "def get_session(", "async def get_async_session(")
    for name in twins:
        assert name in text, f"steps 2 and 10 quote {name}"
    # Step 7: the tests swap the engine, and the app's own start-up migrates their database.
    assert 'patch.setattr(db, "engine", engine)' in text
    assert "prepare_database(db.engine" in text
    assert "dependency_overrides" not in WORKSHOP.read_text()


def test_the_workshop_changes_a_model_with_a_server_default_and_writes_its_migration() -> None:
    """Step 9: a field added to items/item.py, with a server default for the rows that exist; then
    `alembic revision --autogenerate` and `alembic upgrade head`, run (and checked) by the doc run."""
    [change] = [block for block in read_blocks(WORKSHOP) if patched_file(block) == "items/item.py"]
    added = [line[1:] for line in change.lines if line.startswith("+") and not line.startswith("+++")]
    assert any("server_default" in line for line in added), "a NOT NULL column on a table with rows needs one"
    commands = [step.text for _, step in iter_commands(WORKSHOP)]
    assert 'alembic revision --autogenerate -m "item done"' in commands
    assert commands.count("alembic upgrade head") == 2


def test_readme_links_the_workshop() -> None:
    readme = document_path("README.md").read_text()
    assert re.search(r"\]\((\./)?WORKSHOP\.md(#[^)]*)?\)", readme), "README.md has no link to WORKSHOP.md"


# --- The comparison itself, so a document cannot pass by accident ---


@pytest.mark.parametrize(
    "expected, actual, same",
    [
        (['{"id": 1, "t": "2026-11-25T09:30:00Z"}'], '{"t":"2027-01-01T00:00:00.123456Z","id":1}', True),
        (['{"id": 1}'], '{"id": 2}', False),
        (['{"id": 1}'], '{"id": 1, "extra": true}', False),
        (['{"t": "2026-11-25T09:30:00Z"}'], '{"t": "soon"}', False),
        (
            ["HTTP/1.1 201 Created", "...", "location: /items/1", "", '{"id": 1}'],
            'HTTP/1.1 201 Created\r\ndate: x\r\nlocation: /items/1\r\n\r\n{"id":1}',
            True,
        ),
        (["HTTP/1.1 201 Created", "...", "location: /items/1"], "HTTP/1.1 200 OK\r\nlocation: /items/1", False),
        (["INFO:     Started server process [...]"], "INFO:     Started server process [4242]", True),
        (["2026-11-25 14:10:00,000 INFO BEGIN"], "2031-01-02 03:04:05,678 INFO BEGIN", True),
        (["2026-11-25 14:10:00,000 INFO BEGIN"], "2031-01-02 03:04:05,678 INFO COMMIT", False),
        (["one", "..."], "one\ntwo\nthree", True),
        (["one"], "one\ntwo", False),
        ([], "", True),
        ([], "something", False),
    ],
    ids=[
        "json-ignores-field-order-and-matches-any-timestamp",
        "json-value-differs",
        "json-extra-field",
        "json-timestamp-only-matches-a-timestamp",
        "headers-with-an-ellipsis-line-and-a-json-body",
        "status-line-differs",
        "ellipsis-inside-a-line",
        "log-timestamps-match-any-timestamp",
        "log-text-differs",
        "ellipsis-line-matches-the-rest",
        "an-extra-line-is-a-difference",
        "no-output-shown-and-none-printed",
        "no-output-shown-but-some-printed",
    ],
)
def test_output_comparison_follows_the_convention(expected: list[str], actual: str, same: bool) -> None:
    assert same_output(expected, actual) is same


# --- Step 8: the projects feature, added to main.py exactly as the workshop says, with its migration ---


def projects_diff() -> Block:
    return next(block for block in read_blocks(WORKSHOP) if block.info == "diff" and patched_file(block) == "main.py")


def test_the_workshop_adds_projects_with_an_import_and_one_include_router_line() -> None:
    added = [line[1:] for line in projects_diff().lines if line.startswith("+") and not line.startswith("+++")]
    assert added == PROJECTS_LINES


def write_the_migration(alembic_ini: Path, message: str) -> None:
    """What the reader's `alembic revision --autogenerate -m MESSAGE` does: compare the models with a database
    at the newest revision (here a scratch SQLite file next to alembic.ini) and write the difference down."""
    engine = create_engine(f"sqlite:///{alembic_ini.parent / 'scratch.db'}")
    try:
        with engine.connect() as connection:
            config = Config(alembic_ini)
            config.attributes["connection"] = connection  # migrations/env.py then uses this connection
            with schema.migration_transaction(connection):
                alembic.upgrade(config, "head")
            with schema.migration_transaction(connection):
                alembic.revision(config, message=message, autogenerate=True)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def workshop_projects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Path]]:
    """main.py with the workshop's diff applied and projects/project.py written from its text, imported once
    under another name; and a copy of alembic.ini and migrations/ with the migration Alembic writes for it.

    Imported once: a second import would declare the Project table again. The table leaves SQLModel.metadata
    afterwards, so the tests that follow compare the app's own models with the migrations."""
    directory = tmp_path_factory.mktemp("workshop")
    (directory / "main.py").write_text((ROOT / "main.py").read_text())
    apply_diff(projects_diff(), directory)
    for block in read_blocks(WORKSHOP):
        if new_file(block):
            write_new_file(block, directory)
    shutil.copy(ROOT / "alembic.ini", directory)
    shutil.copytree(ROOT / "migrations", directory / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        spec = importlib.util.spec_from_file_location("main_with_projects", directory / "main.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            write_the_migration(directory / "alembic.ini", "projects")
            yield module, directory / "alembic.ini"
        finally:
            if "project" in SQLModel.metadata.tables:
                SQLModel.metadata.remove(SQLModel.metadata.tables["project"])
            for name in ("projects.project", "projects"):
                sys.modules.pop(name, None)


@pytest.fixture(params=BACKENDS)
def projects_client(request: pytest.FixtureRequest, workshop_projects: tuple[ModuleType, Path]) -> Iterator[TestClient]:
    """The app built by main.py's create_app() with the workshop's two lines, on a fresh test database that
    its start-up migrates with the workshop's migration, as the reader's app does."""
    main_with_projects, alembic_ini = workshop_projects
    app = main_with_projects.create_app(async_mode=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schema, "ALEMBIC_INI", alembic_ini)
        schema.head_revision.cache_clear()
        try:
            with new_database("sync", request.param) as database:
                for tested in app_for(database, app=app, raise_server_exceptions=False):
                    yield tested.client
        finally:
            schema.head_revision.cache_clear()


def test_the_migration_alembic_writes_covers_the_model(workshop_projects: tuple[ModuleType, Path]) -> None:
    _, alembic_ini = workshop_projects
    [migration] = (alembic_ini.parent / "migrations" / "versions").glob("*_projects.py")

    assert "op.create_table('project'" in migration.read_text()
    assert "sa.UniqueConstraint('name', name='uq_project_name')" in migration.read_text()


def test_the_migrated_database_is_what_the_models_need(projects_client: TestClient) -> None:
    response = projects_client.get("/health")

    assert response.status_code == 200
    assert response.json()["schema"] == "ok"


def test_creating_a_project_returns_201_with_the_project_and_its_location(projects_client: TestClient) -> None:
    response = projects_client.post("/projects/", json={"name": "home"})

    assert response.status_code == 201
    project = response.json()
    assert project == {"id": project["id"], "name": "home"} and isinstance(project["id"], int)
    assert response.headers["location"] == f"/projects/{project['id']}"


def test_a_duplicate_project_name_returns_409_and_stores_nothing(projects_client: TestClient) -> None:
    projects_client.post("/projects/", json={"name": "home"})

    response = projects_client.post("/projects/", json={"name": "home"})

    assert response.status_code == 409
    assert response.json() == {"detail": "A project with this name already exists"}
    assert [project["name"] for project in projects_client.get("/projects/").json()] == ["home"]


def test_projects_are_listed_ordered_by_id(projects_client: TestClient) -> None:
    names = ["work", "home", "urgent"]
    ids = [projects_client.post("/projects/", json={"name": name}).json()["id"] for name in names]

    response = projects_client.get("/projects/")

    assert response.status_code == 200
    assert [(project["id"], project["name"]) for project in response.json()] == sorted(zip(ids, names))


def test_reading_a_project_returns_it_and_a_missing_one_404(projects_client: TestClient) -> None:
    project = projects_client.post("/projects/", json={"name": "home"}).json()

    assert projects_client.get(f"/projects/{project['id']}").json() == project
    missing = projects_client.get("/projects/999999")
    assert missing.status_code == 404 and missing.json() == {"detail": "Project not found"}


@pytest.mark.parametrize("name, status", [("", 422), ("p" * 50, 201), ("p" * 51, 422), ("nul\u0000", 422)])
def test_a_project_name_has_1_to_50_characters(projects_client: TestClient, name: str, status: int) -> None:
    assert projects_client.post("/projects/", json={"name": name}).status_code == status


def test_items_still_work_next_to_projects(projects_client: TestClient) -> None:
    assert projects_client.post("/items/", json={"title": "Buy milk"}).status_code == 201
    assert projects_client.post("/projects/", json={"name": "Buy milk"}).status_code == 201
