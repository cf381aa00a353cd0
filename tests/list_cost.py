"""What a list costs as the table grows: median latency of one client's requests at 1k, 100k and 1M items.

    python -m tests.list_cost                               # PostgreSQL and SQLite, 1,000 / 100,000 / 1,000,000
    python -m tests.list_cost --sizes 1000,100000 --repeat 20 --databases sqlite
    python -m tests.list_cost --explain                     # + EXPLAIN (ANALYZE, BUFFERS) of the list queries
    python -m tests.list_cost --async                       # the app in async mode (asyncpg, aiosqlite)
    python -m tests.list_cost --sizes 1000 --tags 3         # every item with 3 of 10 shared tags

For each database (a SQLite file in a temporary folder; a fresh PostgreSQL database on --database-url's server,
dropped afterwards) and each size, the `item` table is filled BY SQL to that many rows (only the missing ones
are added as the sizes grow), then a real uvicorn process on 127.0.0.1 serves it and one keep-alive client
times, after warm-ups, --repeat requests of each (at most --seconds per request kind):

- the first page, `GET /items/?limit=100` (which counts every row for X-Total-Count),
- the last page by skip, `GET /items/?skip=<N-100>&limit=100` (the database walks past N-100 rows),
- the last page by cursor, when the app's list answers carry a `Link: <...>; rel="next"` header: the
  first page's next link, with its cursor moved to the end of the table ("-" when there is no Link header),
- one item, `GET /items/{id}`,
- with --tags, the first page of the items that have tag-0, `GET /items/?tag=tag-0&limit=100`.

Prints a markdown table of medians in ms. The fill inserts only title, description and the timestamps:
any other column must come from its server default. With --tags N (at most 10) it also links every item to N
of ten shared tags (`tag-0` ... `tag-9`), so each page carries N tag names per item.
"""

import argparse
import ast
import itertools
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import uuid4

import httpx
from sqlalchemy import make_url

from tests.live import Server, admin_connection

PAGE = 100
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A migration at startup on a million rows may take longer than live.py's 30 s default.
STARTUP_SECONDS = 300
REQUEST_TIMEOUT = 60
KINDS = {
    "first": "first page (limit=100, with X-Total-Count)",
    "skip": "last page by skip",
    "cursor": "next page by cursor (deep)",
    "one": "GET /items/{id}",
    "tagged": "first page of ?tag=tag-0 (with --tags)",
}
LIST_KINDS = ("first", "skip", "cursor", "tagged")


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


# --- The databases: created, filled by SQL, dropped ---


class Database(Protocol):
    label: str
    url: str

    def fill(self, rows: int, tags: int) -> None: ...


TAG_POOL = 10
# The tags, and N links for each item added by this fill: item i gets tag-(i % 10), tag-((i + 1) % 10), ...
INSERT_TAGS = (
    "WITH s(g) AS ({series}) INSERT INTO tag (name) SELECT 'tag-' || g FROM s WHERE NOT EXISTS (SELECT 1 FROM tag)"
)
INSERT_LINKS = (
    "WITH s(g) AS ({series}) INSERT INTO item_tag (item_id, tag_id) SELECT item.id, tag.id FROM item CROSS JOIN s"
    " JOIN tag ON tag.name = 'tag-' || ((item.id + s.g) % {pool}) WHERE item.id > {have}"
)


class SQLiteDatabase:
    label = "SQLite"

    def __init__(self, folder: Path, async_mode: bool) -> None:
        self.path = folder / "list_cost.db"
        self.url = f"sqlite{'+aiosqlite' if async_mode else ''}:///{self.path}"

    def fill(self, rows: int, tags: int) -> None:
        # The app stores datetimes on SQLite as this text (SQLAlchemy's format); one value for every row.
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        with closing(sqlite3.connect(self.path, timeout=30)) as connection:
            with connection:  # one transaction: a million single-row commits would take minutes
                have = connection.execute("SELECT count(*) FROM item").fetchone()[0]
                connection.execute(
                    "INSERT INTO item (title, description, created_at, updated_at)"
                    " WITH RECURSIVE g(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM g WHERE n < :last)"
                    " SELECT 'item ' || n, NULL, :now, :now FROM g",
                    {"first": have + 1, "last": rows, "now": now},
                )
                if tags:
                    connection.execute(INSERT_TAGS.format(series=sqlite_series(TAG_POOL)))
                    connection.execute(INSERT_LINKS.format(series=sqlite_series(tags), pool=TAG_POOL, have=have))
            connection.execute("ANALYZE")
            # Move the rows from the write-ahead log into the database file before the server opens it.
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def sqlite_series(count: int) -> str:
    """0, 1, ... count - 1 as a SQLite row source (SQLite has no generate_series by default)."""
    return " UNION ALL ".join(f"SELECT {n}" for n in range(count))


class PostgresDatabase:
    label = "PG"

    def __init__(self, server_url: str, async_mode: bool) -> None:
        self.server_url = server_url
        self.name = f"list_cost_{uuid4().hex[:12]}"
        driver = "postgresql+asyncpg" if async_mode else "postgresql+psycopg"
        url = make_url(server_url).set(drivername=driver, database=self.name)
        self.url = url.render_as_string(hide_password=False)

    @contextmanager
    def created(self) -> Iterator["PostgresDatabase"]:
        with admin_connection(self.server_url) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        try:
            yield self
        finally:
            with admin_connection(self.server_url) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def fill(self, rows: int, tags: int) -> None:
        with admin_connection(self.url) as connection:
            have = connection.execute("SELECT count(*) FROM item").fetchone()[0]
            connection.execute(
                "INSERT INTO item (title, description, created_at, updated_at)"
                " SELECT 'item ' || g, NULL, now(), now() FROM generate_series(%s::bigint, %s::bigint) g",
                (have + 1, rows),
            )
            if tags:
                connection.execute(INSERT_TAGS.format(series=f"SELECT generate_series(0, {TAG_POOL - 1})"))
                series = f"SELECT generate_series(0, {tags - 1})"
                connection.execute(INSERT_LINKS.format(series=series, pool=TAG_POOL, have=have))
            # VACUUM as well as ANALYZE: autovacuum would otherwise start on the new rows at some point during
            # the measurements; vacuumed, the pages are all-visible (index-only scans, hint bits set) from the start.
            connection.execute("VACUUM (ANALYZE) item")
            if tags:
                connection.execute("VACUUM (ANALYZE) item_tag")


# --- The server and the timings ---


@contextmanager
def serving(database_url: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """tests.live.running_server, with room for a slow migration at startup."""
    server = Server(database_url, env=env)
    try:
        server.wait_until_ready(timeout=STARTUP_SECONDS)
        yield server
    finally:
        server.stop()


@dataclass
class Timing:
    median_ms: float
    samples: int

    def cell(self, repeat: int) -> str:
        return f"{self.median_ms:.1f}" + ("" if self.samples >= repeat else f" (n={self.samples})")


def get_ok(client: httpx.Client, url: str) -> httpx.Response:
    response = client.get(url)
    response.raise_for_status()  # an error page is not a measurement
    return response


def time_requests(client: httpx.Client, url: str, warmups: int, repeat: int, seconds: float) -> Timing:
    """Median of up to `repeat` requests after `warmups`, all within `seconds` (at least one is timed)."""
    deadline = time.monotonic() + seconds
    for _ in range(warmups):
        if time.monotonic() > deadline:
            break
        get_ok(client, url)
    samples: list[float] = []
    while not samples or (len(samples) < repeat and time.monotonic() < deadline):
        started = time.perf_counter()
        get_ok(client, url)
        samples.append(time.perf_counter() - started)
    return Timing(statistics.median(samples) * 1000, len(samples))


def deep_cursor_url(first: httpx.Response, last_page: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The first page's rel="next" link with its cursor moved so that it leads to the last page.

    The cursor is taken to be the query parameter (other than skip and limit) that holds an id: the id the
    first page ends on, or the one after. The same step from the item before the last page leads to the
    last page (the ids are contiguous here: the table was filled by one series). Returns (url, note).
    """
    link = first.links.get("next")
    if link is None:
        return None, "no Link rel=next header"
    parts = urlsplit(link["url"])
    query = parse_qsl(parts.query, keep_blank_values=True)
    first_page_end = first.json()[-1]["id"]
    for index, (name, value) in enumerate(query):
        if name not in ("skip", "limit") and re.fullmatch(r"-?\d+", value):
            step = int(value) - first_page_end
            query[index] = (name, str(last_page[0]["id"] - 1 + step))
            return urlunsplit(("", "", parts.path, urlencode(query), "")), f"from Link {link['url']}"
    return None, f"no id cursor in Link {link['url']} (an opaque cursor cannot be moved)"


def page_urls(client: httpx.Client, size: int, tags: int) -> tuple[dict[str, str], list[str]]:
    """The URL of each request kind for a table of `size` rows, and notes on anything unexpected."""
    notes = []
    first_url = f"/items/?limit={PAGE}"
    first = get_ok(client, first_url)
    if first.headers.get("x-total-count") != str(size):
        notes.append(f"X-Total-Count {first.headers.get('x-total-count')!r}, expected {size}")
    skip_url = f"/items/?skip={max(0, size - PAGE)}&limit={PAGE}"
    last_page = get_ok(client, skip_url).json()
    urls = {"first": first_url, "skip": skip_url, "one": f"/items/{last_page[-1]['id']}"}
    if tags:
        urls["tagged"] = f"/items/?tag=tag-0&limit={PAGE}"
    cursor_url, note = deep_cursor_url(first, last_page)
    notes.append(f"cursor: {note}")
    if cursor_url is not None:
        urls["cursor"] = cursor_url
        # A deep page that is not the last page would time something else than the skip column.
        cursor_ids = [item["id"] for item in get_ok(client, cursor_url).json()]
        if cursor_ids != [item["id"] for item in last_page]:
            notes.append(f"the cursor page {cursor_url} is not the last page (ids {cursor_ids[:1]}..{cursor_ids[-1:]})")
    return urls, notes


def measure(server: Server, size: int, args: argparse.Namespace) -> tuple[dict[str, Timing], dict[str, str], list[str]]:
    """Each request kind in turn, over one kept-alive connection: the latency of a request, not of a connect."""
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        urls, notes = page_urls(client, size, args.tags)
        timings = {
            kind: time_requests(client, url, args.warmups, args.repeat, args.seconds) for kind, url in urls.items()
        }
    return timings, urls, notes


# --- EXPLAIN of the statements the app runs for a list (PostgreSQL) ---

# SQLAlchemy's echo: each log record starts with this; a statement is followed by a record of its parameters.
ECHO_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO sqlalchemy\.engine\.Engine ", re.MULTILINE)
PARAMETERS = re.compile(r"^\[[^\]]*\] (.*)$", re.DOTALL)


def logged_selects(log: str) -> Iterator[tuple[str, Any]]:
    """The (statement, parameters) of each SELECT on the item table in a stretch of echo log."""
    records = [record.strip() for record in ECHO_RECORD.split(log)[1:]]
    for statement, following in itertools.pairwise(records):
        parameters = PARAMETERS.match(following)
        if statement.startswith("SELECT") and re.search(r"\bFROM item\b", statement) and parameters:
            yield statement, ast.literal_eval(parameters.group(1)) or None


def explain_lists(database: PostgresDatabase, urls: dict[str, str]) -> str:
    """A server with DATABASE_ECHO=1 answers each list URL once; every SELECT it logs is run again under EXPLAIN.

    The server runs on psycopg whatever the mode: its logged statements (%(name)s parameters) run as they
    are on a psycopg connection, and the statements are the same in both modes.
    """
    sync_url = make_url(database.url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    blocks = []
    with (
        serving(sync_url, env={"DATABASE_ECHO": "1"}) as server,
        httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as client,
    ):
        for kind in LIST_KINDS:
            if kind not in urls:
                continue
            seen = len(server.read_log())
            get_ok(client, urls[kind])
            for statement, parameters in logged_selects(server.read_log()[seen:]):
                with admin_connection(database.url) as connection:
                    rows = connection.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters).fetchall()
                plan = "\n".join(row[0] for row in rows)
                blocks.append(f"{KINDS[kind]}: GET {urls[kind]}\n{statement}\n-- parameters: {parameters}\n\n{plan}")
    return "\n\n".join(blocks)


# --- One database at every size, then the table ---


@dataclass
class Row:
    timings: dict[str, dict[str, Timing]]  # database label -> kind -> timing
    fill_seconds: dict[str, float]


def run_database(database: Database, sizes: list[int], args: argparse.Namespace, rows: dict[int, Row]) -> str:
    """Fill and measure one database at each size; returns the EXPLAIN text (PostgreSQL, --explain)."""
    progress(f"{database.label}: {database.url}")
    # The app creates (or migrates) its schema at startup: the fill needs the table.
    with serving(database.url):
        pass
    explained = ""
    for size in sizes:
        started = time.monotonic()
        database.fill(size, args.tags)
        filled = time.monotonic() - started
        progress(f"{database.label} {size:,} rows: filled in {filled:.1f} s")
        started = time.monotonic()
        with serving(database.url) as server:
            timings, urls, notes = measure(server, size, args)
        measured = time.monotonic() - started
        progress(f"{database.label} {size:,} rows: measured in {measured:.1f} s; " + "; ".join(notes))
        row = rows.setdefault(size, Row({}, {}))
        row.timings[database.label] = timings
        row.fill_seconds[database.label] = filled
        if args.explain and isinstance(database, PostgresDatabase) and size == sizes[-1]:
            explained = explain_lists(database, urls)
    return explained


def markdown_table(rows: dict[int, Row], labels: list[str], repeat: int) -> str:
    header = ["items"] + [f"{label} {title}" for label in labels for title in KINDS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, row in sorted(rows.items()):
        cells = [f"{size:,}"]
        for label in labels:
            timings = row.timings.get(label, {})
            cells += [timings[kind].cell(repeat) if kind in timings else "-" for kind in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server on the loopback (any database on it): a fresh database is created there and dropped",
    )
    parser.add_argument("--databases", default="pg,sqlite", help="pg, sqlite or both (default)")
    parser.add_argument("--sizes", default="1000,100000,1000000", help="row counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per kind and size")
    parser.add_argument("--warmups", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30, help="at most this long per kind and size")
    parser.add_argument("--async", dest="async_mode", action="store_true", help="the app in async mode")
    parser.add_argument("--tags", type=int, default=0, help=f"tags per item, 0 to {TAG_POOL} (default 0)")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN (ANALYZE, BUFFERS) the PG list queries")
    args = parser.parse_args()
    args.sizes = sorted({int(size) for size in args.sizes.split(",")})
    args.databases = [name.strip() for name in args.databases.split(",")]
    if min(args.sizes) < PAGE:
        parser.error(f"every size must be at least {PAGE} (a full last page)")
    if not 0 <= args.tags <= TAG_POOL:
        parser.error(f"--tags takes 0 to {TAG_POOL}")
    if set(args.databases) - {"pg", "sqlite"}:
        parser.error("--databases takes pg, sqlite or both")
    if make_url(args.database_url).host not in LOOPBACK:
        parser.error("the PostgreSQL server must be on the loopback (127.0.0.1)")
    return args


def main() -> None:
    args = arguments()
    rows: dict[int, Row] = {}
    labels = []
    explained = ""
    started = time.monotonic()
    if "pg" in args.databases:
        database = PostgresDatabase(args.database_url, args.async_mode)
        with database.created():
            explained = run_database(database, args.sizes, args, rows)
        labels.append(database.label)
    if "sqlite" in args.databases:
        with tempfile.TemporaryDirectory() as folder:
            sqlite_database = SQLiteDatabase(Path(folder), args.async_mode)
            run_database(sqlite_database, args.sizes, args, rows)
        labels.append(sqlite_database.label)

    mode = "async" if args.async_mode else "sync"
    print(
        f"Median latency in ms of one keep-alive client, {args.repeat} requests after {args.warmups} warm-ups "
        f"(fewer, shown as n=, when --seconds {args.seconds:g} ran out); app in {mode} mode; "
        f"{args.tags} tags per item.\n"
    )
    print(markdown_table(rows, labels, args.repeat))
    fills = "; ".join(
        f"{label} " + ", ".join(f"{size:,} in {row.fill_seconds[label]:.1f} s" for size, row in sorted(rows.items()))
        for label in labels
    )
    print(f"\nFill by SQL (adding the rows each size lacks): {fills}. Whole run {time.monotonic() - started:.0f} s.")
    if explained:
        print(f"\nEXPLAIN (ANALYZE, BUFFERS) at {args.sizes[-1]:,} items, PostgreSQL:\n\n```text\n{explained}\n```")


if __name__ == "__main__":
    main()
