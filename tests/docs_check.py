"""Reading the docs' fenced blocks and checking them against the code: the machinery of tests/test_workshop.py.

The convention itself is described at the top of tests/test_workshop.py. To see what a document's commands
print today (to write or fix a document), run from the repository root:

    python -m tests.docs_check WORKSHOP.md               # its SQLite steps
    python -m tests.docs_check WORKSHOP.md --postgresql  # its PostgreSQL steps (needs TEST_DATABASE_URL)
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import make_url

from core.config import Settings
from tests import live
from tests.live import ROOT, Server

BIN = Path(sys.executable).parent
READER_PORT = 8000
READER_ADDRESS = re.compile(rf"\b(localhost|127\.0\.0\.1):{READER_PORT}\b")
COMMAND_TIMEOUT = 60
LOG_WAIT = 5
SHELL_BLOCKS = ("bash", "sh", "shell")

# --- Reading a document ---


@dataclass
class Block:
    """A fenced block: its info string (console, bash, server-log, python, diff...), its lines, where it starts."""

    info: str
    lines: list[str]
    line: int
    document: str

    @property
    def where(self) -> str:
        return f"{self.document} line {self.line}"


@dataclass
class Command:
    """A command, and the output the document shows after it (None in a ```bash block, which shows none)."""

    text: str
    expected: list[str] | None
    line: int
    document: str

    @property
    def where(self) -> str:
        return f"{self.document} line {self.line}: `{self.text}`"


FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})\s*(?P<info>[^`\s]*)")


def read_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        indent, fence, start = len(opening["indent"]), opening["fence"], number
        body: list[str] = []
        while number < len(lines) and not lines[number].strip().startswith(fence):
            body.append(lines[number][indent:] if lines[number][:indent].isspace() else lines[number])
            number += 1
        number += 1
        blocks.append(Block(opening["info"].lower(), body, start, path.name))
    return blocks


def read_commands(block: Block) -> list[Command]:
    """The commands of a ```console block (`$ ` lines) or of a ```bash block (every line but comments)."""
    if block.info in SHELL_BLOCKS:
        return read_shell_commands(block)
    if block.info != "console":
        return []
    commands: list[Command] = []
    for offset, line in enumerate(block.lines):
        if line.startswith("$ "):
            commands.append(Command(line[2:], [], block.line + offset + 1, block.document))
        elif not commands:
            if line.strip():
                raise ValueError(f"{block.where}: a console block starts with a `$ ` command, not {line!r}")
        elif (line.startswith("> ") or line == ">") and not commands[-1].expected:
            commands[-1].text += "\n" + line[2:]
        else:
            commands[-1].expected.append(line)  # type: ignore[union-attr]
    for command in commands:
        while command.expected and not command.expected[-1].strip():
            command.expected.pop()
    return commands


def read_shell_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    pending = ""
    for offset, line in enumerate(block.lines):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.removeprefix("$ ")
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        commands.append(Command(pending.strip(), None, block.line + offset + 1, block.document))
        pending = ""
    return commands


def iter_commands(document: Path) -> Iterator[tuple[Block, Command]]:
    for block in read_blocks(document):
        for command in read_commands(block):
            yield block, command


POSTGRESQL_WORDS = re.compile(r"\b(postgres|postgresql|createdb|dropdb|psql)\b")


def postgresql_blocks(blocks: list[Block]) -> list[bool]:
    """Which blocks need PostgreSQL: those that mention it, and those that talk to a server started on it."""
    needs, server_on_postgresql = [], False
    for block in blocks:
        commands = read_commands(block)
        mentions = any(POSTGRESQL_WORDS.search(command.text) for command in commands)
        if any(kind(command.text) == "server" for command in commands):
            server_on_postgresql = mentions
        talks_to_server = block.info == "server-log" or any(READER_ADDRESS.search(c.text) for c in commands)
        needs.append(mentions or (talks_to_server and server_on_postgresql))
    return needs


def quoted_file(block: Block) -> str | None:
    """The file a ```python block quotes, named by its first line: `# items/item.py`."""
    if block.info not in ("python", "py") or not block.lines:
        return None
    named = re.fullmatch(r"#\s*([\w./-]+\.\w+)\s*", block.lines[0])
    return named[1] if named else None


def new_file(block: Block) -> str | None:
    """The file a ```python block asks the reader to create, named by its first line: `# tags/tag.py (a new file)`."""
    if block.info not in ("python", "py") or not block.lines:
        return None
    named = re.fullmatch(r"#\s*([\w./-]+\.\w+)\s+\(a new file\)\s*", block.lines[0])
    return named[1] if named else None


def write_new_file(block: Block, root: Path) -> None:
    """Create the file a new-file block shows, under root, as the reader would."""
    path = root / str(new_file(block))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(quoted_code(block) + "\n")


def quoted_code(block: Block) -> str:
    return "\n".join(block.lines[1:]).strip("\n")


def patched_file(block: Block) -> str | None:
    """The file a ```diff block patches, from its `+++ b/main.py` header."""
    header = next((line for line in block.lines if line.startswith("+++ ")), None)
    return re.sub(r"^\+\+\+ (b/)?", "", header).strip() if block.info == "diff" and header else None


def apply_diff(block: Block, root: Path) -> None:
    """Apply a ```diff block to the files under root with `git apply`; fails when its context has drifted."""
    result = subprocess.run(
        ["git", "apply", "--verbose", "-"],
        check=False,
        input="\n".join(block.lines) + "\n",
        cwd=root,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, f"{block.where}: the diff does not apply to {patched_file(block)}:\n{result.stderr}"


# --- What a command is ---

ENVIRONMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
VENV = ".venv/bin/"
SETUP_COMMANDS = {
    "python3 -m venv .venv",
    "source .venv/bin/activate",
    ". .venv/bin/activate",
    "pip install -r requirements.txt",
    "python -m pip install -r requirements.txt",
}
SERVER_COMMAND = "uvicorn main:app"
REVISION_COMMAND = "alembic revision"


def split_environment(command: str) -> tuple[dict[str, str], str]:
    """`A=1 B=2 uvicorn main:app` -> ({"A": "1", "B": "2"}, "uvicorn main:app"); a leading .venv/bin/ is dropped."""
    words = shlex.split(command)
    environment: dict[str, str] = {}
    while words and ENVIRONMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        environment[name] = value
    if words:
        words[0] = words[0].removeprefix(VENV)
    return environment, shlex.join(words)


def kind(command: str) -> str:
    """What the docs test does with a command: "server", "suite", "setup" (stood in for), "revision" (run, and
    in the PostgreSQL pass too: it writes a migration later steps need) or "run"."""
    if "\n" in command:
        return "run"
    _, rest = split_environment(command)
    if rest.split(" ", 1)[0] in ("uvicorn", "fastapi"):
        return "server"
    if "pytest" in rest:
        return "suite"
    if rest.startswith(f"{REVISION_COMMAND} "):
        return "revision"
    parts = [split_environment(part)[1] for part in command.split("&&")]
    if all(part in SETUP_COMMANDS for part in parts):
        return "setup"
    return "run"


def setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def server_problems(command: str) -> list[str]:
    environment, rest = split_environment(command)
    problems = []
    if rest != SERVER_COMMAND:
        hint = " (fastapi-cli is not in requirements.txt)" if rest.startswith("fastapi") else ""
        problems.append(f"start the server with `{SERVER_COMMAND}`, the command the test runs{hint}")
    unknown = set(environment) - setting_names()
    if unknown:
        problems.append(f"{sorted(unknown)} are not settings of core/config.py")
    url = environment.get("DATABASE_URL", Settings.model_fields["database_url"].default)
    if url.startswith("sqlite") and not re.fullmatch(r"sqlite(\+aiosqlite)?:///\./[\w.-]+\.db", url):
        problems.append(f"{url}: use a SQLite file next to main.py (sqlite:///./NAME.db), fresh in each test run")
    return problems


@cache
def suite_command() -> str:
    """The command .ci/run runs the tests with: `.venv/bin/python -m pytest`."""
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        found = re.match(r"\s*(\S*python -m pytest)\b", line)
        if found:
            return found[1]
    raise AssertionError(".ci/run runs no `python -m pytest`")


# --- Comparing output ---

ISO_TIMESTAMP = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
HTTP_DATE = r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT"
TIMESTAMP = re.compile(f"{ISO_TIMESTAMP}|{HTTP_DATE}")
NOT_JSON = object()


def same_json(expected: object, actual: object) -> bool:
    """Structural equality, where a timestamp string matches any timestamp string."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(same_json(expected[k], actual[k]) for k in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(same_json, expected, actual))
    if isinstance(expected, str) and isinstance(actual, str):
        return expected == actual or bool(TIMESTAMP.fullmatch(expected) and TIMESTAMP.fullmatch(actual))
    return type(expected) is type(actual) and expected == actual


def as_json(text: str) -> object:
    """The JSON value of text, or NOT_JSON: only an object or an array counts as JSON here."""
    if not text.strip().startswith(("{", "[")):
        return NOT_JSON
    try:
        return json.loads(text)
    except ValueError:
        return NOT_JSON


def same_line(expected: str, actual: str) -> bool:
    expected_json = as_json(expected)
    if expected_json is not NOT_JSON:
        return same_json(expected_json, as_json(actual))
    expected, actual = TIMESTAMP.sub("<timestamp>", expected), TIMESTAMP.sub("<timestamp>", actual)
    if "..." not in expected:
        return expected == actual
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual) is not None


def same_lines(expected: list[str], actual: list[str]) -> bool:
    """Line by line; an expected line that is just `...` stands for any number of lines, none included."""

    @cache
    def match(e: int, a: int) -> bool:
        if e == len(expected):
            return a == len(actual)
        if expected[e].strip() == "...":
            return any(match(e + 1, later) for later in range(a, len(actual) + 1))
        return a < len(actual) and same_line(expected[e], actual[a]) and match(e + 1, a + 1)

    return match(0, 0)


def output_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def same_output(expected: list[str], actual_text: str) -> bool:
    whole = as_json("\n".join(expected))
    if whole is not NOT_JSON:
        return same_json(whole, as_json(actual_text))
    return same_lines(output_lines("\n".join(expected)), output_lines(actual_text))


def mismatch(where: str, expected: list[str], actual: str, source: str = "the command printed") -> str:
    shown = "\n".join(f"    {line}" for line in expected) or "    (nothing)"
    got = "\n".join(f"    {line}" for line in output_lines(actual)) or "    (nothing)"
    return f"{where}\n  the document shows:\n{shown}\n  {source}:\n{got}"


# --- Running a document ---


def reader_environment() -> dict[str, str]:
    """A shell like the reader's: the venv's bin first on PATH, and none of the app's settings set."""
    hidden = setting_names() | {"TEST_DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH"}
    environment = {name: value for name, value in os.environ.items() if name not in hidden}
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    return environment


class DocServer(Server):
    """tests/live.py's Server, started as the reader starts it: `uvicorn main:app` with its access log, in `cwd`."""

    def __init__(self, cwd: Path, environment: dict[str, str]) -> None:
        super().__init__(None, cwd=cwd, access_log=True, base_env=environment)

    def reader_log(self) -> str:
        """The log as the reader's terminal shows it: a server on port 8000."""
        return self.read_log().replace(f"127.0.0.1:{self.port}", f"127.0.0.1:{READER_PORT}")

    def wait_until_ready(self, timeout: float = 30) -> None:
        """Ready when /health answers at all: a server whose models and database differ serves too, and says so
        there with a 503 (a document may show just that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not answer within {timeout} s:\n{self.stop()}")


def copy_repository(destination: Path) -> Path:
    """The reader's working copy: the repository's files, without databases, caches or virtual environments."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "__pycache__", ".*_cache", ".hypothesis", "*.db", "*.db-wal", "*.db-shm"
    )
    return Path(shutil.copytree(ROOT, destination / "repository", ignore=ignore))


GIT = ["git", "-c", "user.name=Reader", "-c", "user.email=reader@example.invalid", "-c", "commit.gpgsign=false"]


def make_fresh_clone(repository: Path) -> None:
    """Make the copy a git repository whose one commit holds its files, as a fresh clone: `git diff` then shows
    exactly the reader's changes."""
    for arguments in (["init", "-q"], ["add", "-A"], ["commit", "-q", "--no-verify", "-m", "As cloned"]):
        subprocess.run([*GIT, *arguments], cwd=repository, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@dataclass
class DocRun:
    """Runs one document's blocks in order, as a reader would, in a copy of the repository.

    With `postgresql` False it runs every block except those needing PostgreSQL; with True only those, with
    every database they create or serve from renamed to a fresh one, dropped at the end.
    """

    document: Path
    workdir: Path
    postgresql: bool = False
    keep_going: bool = False
    report: Callable[[str], None] = lambda _text: None
    server: DocServer | None = None
    renamed: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    commands_run: int = 0

    def __post_init__(self) -> None:
        self.repository = copy_repository(self.workdir)
        make_fresh_clone(self.repository)
        self.environment = reader_environment()

    def run(self) -> None:
        try:
            blocks = read_blocks(self.document)
            for block, needs_postgresql in zip(blocks, postgresql_blocks(blocks)):
                if block.info == "diff":
                    apply_diff(block, self.repository)
                elif new_file(block):
                    write_new_file(block, self.repository)
                elif needs_postgresql != self.postgresql:
                    if self.postgresql:
                        for command in read_commands(block):
                            if kind(command.text) == "revision":
                                self.write_revision_elsewhere(command)
                    continue
                elif block.info == "server-log":
                    self.check_server_log(block)
                for command in read_commands(block):
                    self.run_command(command)
        finally:
            self.close()

    def fail(self, message: str) -> None:
        if not self.keep_going:
            raise AssertionError(message)
        self.failures.append(message)
        self.report(f"MISMATCH {message}")

    # --- each kind of command ---

    def run_command(self, command: Command) -> None:
        what = kind(command.text)
        self.report(f"$ {command.text}")
        if what == "server":
            self.start_server(command)
        elif what in ("run", "revision"):
            self.run_in_shell(command)
        # "setup" and "suite" commands are checked by test_workshop, without running them.

    def write_revision_elsewhere(self, command: Command) -> None:
        """PostgreSQL pass: an `alembic revision` of the SQLite steps still writes its migration, which later
        PostgreSQL steps migrate with; it compares against a scratch SQLite database at the newest revision."""
        scratch = {"DATABASE_URL": f"sqlite:///{self.workdir / 'scratch.db'}"}
        self.run_in_shell(Command("alembic upgrade head", None, command.line, command.document), scratch)
        self.run_in_shell(command, scratch)

    def run_in_shell(self, command: Command, settings: dict[str, str] | None = None) -> None:
        text = self.rename_databases(command.text).replace(VENV, f"{BIN}/")
        if READER_ADDRESS.search(text):
            if self.server is None:
                self.start_server(Command(SERVER_COMMAND, None, command.line, command.document))
            assert self.server is not None
            text = READER_ADDRESS.sub(f"127.0.0.1:{self.server.port}", text)
        result = subprocess.run(
            ["bash", "-c", text],
            check=False,
            cwd=self.repository,
            env=self.environment | (settings or {}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        self.commands_run += 1
        self.report(result.stdout)
        if result.returncode != 0:
            self.fail(f"{command.where} exited with {result.returncode}:\n{result.stdout}")
        elif command.expected is not None and not same_output(command.expected, result.stdout):
            self.fail(mismatch(command.where, command.expected, result.stdout))

    def start_server(self, command: Command) -> None:
        """The reader stops the running server (Ctrl+C) and starts this one; its log must begin as shown."""
        self.stop_server()
        settings, _ = split_environment(self.rename_databases(command.text))
        if self.postgresql and "DATABASE_URL" in settings:
            settings["DATABASE_URL"] = self.fresh_database_url(settings["DATABASE_URL"])
        self.server = DocServer(self.repository, self.environment | settings | {"PYTHONUNBUFFERED": "1"})
        self.server.wait_until_ready(timeout=30)
        self.commands_run += 1
        log = self.server.reader_log()
        self.report(log)
        if command.expected is not None and not same_lines([*command.expected, "..."], output_lines(log)):
            self.fail(mismatch(command.where, command.expected, log, "the server's log begins"))

    def check_server_log(self, block: Block) -> None:
        """The block's lines appear, in order and together, in the log of the running server."""
        if self.server is None:
            self.fail(f"{block.where}: a server-log block with no server running")
            return
        expected = ["...", *block.lines, "..."]
        deadline = time.monotonic() + LOG_WAIT
        while not same_lines(expected, output_lines(self.server.reader_log())):
            if time.monotonic() > deadline:
                self.fail(mismatch(block.where, block.lines, self.server.reader_log(), "the server's log is"))
                return
            time.sleep(0.1)

    # --- PostgreSQL: the databases a document creates or serves from get fresh names ---

    def fresh_name(self, name: str) -> str:
        if name not in self.renamed:
            self.renamed[name] = f"{name}_{uuid.uuid4().hex[:10]}"
        return self.renamed[name]

    def rename_databases(self, text: str) -> str:
        """In the PostgreSQL pass, `createdb workshop` and `dropdb workshop` act on a fresh database."""
        if not self.postgresql:
            return text
        for name in re.findall(r"\b(?:createdb|dropdb)\b[^\n]*?\s([A-Za-z_]\w*)\s*$", text, re.MULTILINE):
            self.fresh_name(name)
        for name, fresh in self.renamed.items():
            text = re.sub(rf"\b((?:createdb|dropdb)\b[^\n]*\s){re.escape(name)}\b", rf"\g<1>{fresh}", text)
        return text

    def fresh_database_url(self, raw_url: str) -> str:
        """The server's database, renamed; created here unless the document created it."""
        url = make_url(raw_url)
        fresh = self.fresh_name(url.database or "postgres")
        with admin_connection() as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (fresh,)).fetchone():
                admin.execute(f'CREATE DATABASE "{fresh}"')
        return url.set(database=fresh).render_as_string(hide_password=False)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def close(self) -> None:
        self.stop_server()
        if self.renamed:
            with admin_connection() as admin:
                for fresh in self.renamed.values():
                    admin.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')


# --- PostgreSQL for the documents' steps ---

DOCUMENTED_SERVER = ("127.0.0.1", 5432, "postgres")


def postgresql_unavailable() -> str | None:
    """Why the documents' PostgreSQL steps cannot run here, or None when they can."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if not configured:
        return "set TEST_DATABASE_URL to run the PostgreSQL steps of the docs (CI does)"
    url = make_url(configured)
    if (url.host, url.port or 5432, url.username) != DOCUMENTED_SERVER:
        return "the docs' PostgreSQL steps use postgres@127.0.0.1:5432, and TEST_DATABASE_URL points elsewhere"
    return None


def admin_connection() -> psycopg.Connection:
    return live.admin_connection(os.environ["TEST_DATABASE_URL"])


def main(arguments: list[str]) -> int:
    document = ROOT / arguments[0]
    postgresql = "--postgresql" in arguments
    with tempfile.TemporaryDirectory() as workdir:
        run = DocRun(document, Path(workdir), postgresql=postgresql, keep_going=True, report=print)
        run.run()
    print(f"\n{run.commands_run} commands run, {len(run.failures)} mismatches")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
