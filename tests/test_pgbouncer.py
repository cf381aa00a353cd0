"""The app behind PgBouncer in transaction pooling mode, sync and async: prepared statements are the trap."""

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import make_url

from tests.conftest import TEST_DATABASE_URL, Database, admin_connection, new_database
from tests.live import free_port, mixed_load, running_server

PGBOUNCER = Path("/usr/sbin/pgbouncer")
ANSWERS = {200, 201, 204, 404, 409, 422}
POOL = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10"}
NO_PREPARED_STATEMENTS = {"DB_PREPARED_STATEMENTS": "false"}
SERVER_CONNECTIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"

# min_pool_size + server_round_robin: five server connections per database, and each transaction takes the
# next one, so a statement prepared in one transaction is missing in the next, every time. "*" routes any
# database name, so each test's fresh database is reachable without its own entry.
INI = """\
[databases]
* = host={host} port={port} user={user} {password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = 5
min_pool_size = 5
server_round_robin = 1
max_client_conn = 200
"""


def wait_until_pgbouncer_answers(process: subprocess.Popen, port: int, log: Path, timeout: float = 10) -> None:
    """A real query through it, not just an open port: the wildcard database must reach PostgreSQL too."""
    url = make_url(TEST_DATABASE_URL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user=url.username, dbname=url.database, connect_timeout=2
            ):
                return
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise TimeoutError(f"pgbouncer did not answer within {timeout} s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def pgbouncer(postgresql_required: None) -> Iterator[int]:
    """PgBouncer on a free loopback port, in front of TEST_DATABASE_URL's server; yields the port."""
    if not PGBOUNCER.exists():
        pytest.skip(f"{PGBOUNCER} is missing: apt-get install -y pgbouncer")
    upstream = make_url(TEST_DATABASE_URL)
    # pgbouncer refuses to run as root and runs as postgres, who cannot enter pytest's 0o700 tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        port = free_port()
        password = f"password={upstream.password}" if upstream.password else ""
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            INI.format(
                host=upstream.host or "127.0.0.1",
                port=upstream.port or 5432,
                user=upstream.username,
                password=password,
                listen_port=port,
                directory=directory,
            )
        )
        # Even with auth_type = trust, PgBouncer admits only the users listed here.
        (directory / "userlist.txt").write_text(f'"{upstream.username}" ""\n')
        for path in directory.iterdir():
            path.chmod(0o644)
        # Its log goes to a file we open (pgbouncer logs to stderr in the foreground): a full pipe would block it.
        log = directory / "pgbouncer.log"
        with log.open("w") as log_file:
            process = subprocess.Popen([PGBOUNCER, "-u", "postgres", ini], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_until_pgbouncer_answers(process, port, log)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def through(port: int, database_url: str) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def wait_for_server_connections(database: Database, wanted: int = 5, timeout: float = 10) -> None:
    """PgBouncer opens min_pool_size connections only once a client is connected: wait for all of them,
    else a single server connection would keep every prepared statement and hide the trap."""
    name = make_url(database.url).database
    deadline = time.monotonic() + timeout
    with admin_connection() as admin:
        while (found := admin.execute(SERVER_CONNECTIONS, (name,)).fetchone()[0]) < wanted:
            assert time.monotonic() < deadline, f"PgBouncer opened {found} of {wanted} server connections"
            time.sleep(0.1)


def creates_one_by_one(client: httpx.Client, count: int = 20) -> Counter:
    """Committed writes of one statement on one pooled connection: the trap springs at the statement's 6th run.

    psycopg prepares a statement on its 6th run and forgets it on any rollback (a read-only request ends
    in one), so it takes a run of commits; asyncpg prepares every statement at once.
    """
    return Counter(client.post("/items/", json={"title": f"one-{n}"}).status_code for n in range(count))


def committed_writes(client: httpx.Client) -> dict[int, dict]:
    """Create, replace, patch and delete, one request at a time; returns the items that should remain, by id."""
    remaining = {}
    for n in range(12):
        created = client.post("/items/", json={"title": f"pgb-{n}"})
        assert created.status_code == 201, created.text
        item_id = created.json()["id"]
        assert client.put(f"/items/{item_id}", json={"title": f"pgb-{n}-put", "description": "put"}).status_code == 200
        patched = client.patch(f"/items/{item_id}", json={"description": f"patched {n}"})
        assert patched.status_code == 200, patched.text
        if n % 2:
            remaining[item_id] = patched.json()
        else:
            assert client.delete(f"/items/{item_id}").status_code == 204
    return remaining


def every_item(client: httpx.Client) -> dict[int, dict]:
    """All items, page by page (the mixed load writes more than one page)."""
    items: dict[int, dict] = {}
    while page := client.get("/items/", params={"skip": len(items), "limit": 100}).json():
        items |= {item["id"]: item for item in page}
    return items


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_app_behind_pgbouncer_transaction_pooling_serves_every_request_without_5xx(pgbouncer: int, mode: str) -> None:
    with (
        new_database(mode, "postgresql") as database,
        running_server(through(pgbouncer, database.url), env=POOL | NO_PREPARED_STATEMENTS) as server,
    ):
        wait_for_server_connections(database)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # One request at a time first, while the app holds a single pooled connection: the control's case.
            creates = creates_one_by_one(client)
            written = committed_writes(client)
            result = asyncio.run(mixed_load(server.url, clients=20, total_requests=600, seconds=60))
            stored = every_item(client)
            read_back = [client.get(f"/items/{item_id}").json() for item_id in written]
        log = server.stop()

    assert creates == {201: 20}
    assert sum(result.statuses.values()) == 600
    assert set(result.statuses) <= ANSWERS, result.statuses
    assert [(item["title"], item["description"]) for item in written.values()] == [
        (f"pgb-{n}-put", f"patched {n}") for n in range(1, 12, 2)
    ]
    assert read_back == list(written.values()), "the writes survived the mixed load"
    assert {key: item for key, item in stored.items() if item["title"].startswith("pgb-")} == written, "and no more"
    assert "prepared statement" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_without_turning_off_prepared_statements_pgbouncer_breaks_the_app(pgbouncer: int, mode: str) -> None:
    # The control, proving the test above can fail: the same server and writes, with prepared statements on.
    with (
        new_database(mode, "postgresql") as database,
        running_server(through(pgbouncer, database.url), env=POOL) as server,
    ):
        wait_for_server_connections(database)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            statuses = creates_one_by_one(client)
        log = server.stop()

    assert any(status >= 500 for status in statuses), statuses
    assert "prepared statement" in log and "does not exist" in log, log
