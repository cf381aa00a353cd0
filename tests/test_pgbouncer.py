"""The app behind PgBouncer in transaction pooling mode, sync and async: prepared statements are the trap."""

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import make_url

from tests.conftest import TEST_DATABASE_URL, new_database
from tests.live import free_port, mixed_load, running_server

PGBOUNCER = Path("/usr/sbin/pgbouncer")
ANSWERS = {200, 201, 204, 404, 409, 422}
POOL = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10"}

# min_pool_size + server_round_robin: every server connection is open from the start and each transaction
# takes the next one, so a prepared statement left on one connection is missing on the next, every time.
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2) as c:
                c.execute("SELECT 1")
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
                user=upstream.username or "postgres",
                password=password,
                listen_port=port,
                directory=directory,
            )
        )
        (directory / "userlist.txt").write_text('"postgres" ""\n')
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
    """All items, page by page (the mixed load wrote more than one page)."""
    items: dict[int, dict] = {}
    while page := client.get("/items/", params={"skip": len(items), "limit": 100}).json():
        items |= {item["id"]: item for item in page}
    return items


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_app_behind_pgbouncer_transaction_pooling_serves_every_request_without_5xx(pgbouncer: int, mode: str) -> None:
    with new_database(mode, "postgresql") as database:
        env = POOL | {"DB_PREPARED_STATEMENTS": "false"}
        with running_server(through(pgbouncer, database.url), env=env) as server:
            result = asyncio.run(mixed_load(server.url, clients=20, total_requests=600, seconds=60))
            with httpx.Client(base_url=server.url, timeout=30) as client:
                written = committed_writes(client)
                stored = every_item(client)
                read_back = [client.get(f"/items/{item_id}").json() for item_id in written]
            log = server.stop()

    assert sum(result.statuses.values()) == 600
    assert set(result.statuses) <= ANSWERS, result.statuses
    assert [(item["title"], item["description"]) for item in written.values()] == [
        (f"pgb-{n}-put", f"patched {n}") for n in range(1, 12, 2)
    ]
    assert read_back == list(written.values())
    assert {k: v for k, v in stored.items() if v["title"].startswith("pgb-")} == written, "deleted items are gone"
    assert "prepared statement" not in log and "Traceback" not in log, log


def burst(base_url: str, requests: int = 200) -> Counter:
    """Reads and writes from 10 threads at once; any status, including 5xx, is counted rather than raised."""

    def send(n: int) -> int:
        if n % 2:
            return client.post("/items/", json={"title": f"burst-{n}"}).status_code
        return client.get("/items/").status_code

    with httpx.Client(base_url=base_url, timeout=30) as client, ThreadPoolExecutor(max_workers=10) as pool:
        return Counter(pool.map(send, range(requests)))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_without_turning_off_prepared_statements_pgbouncer_breaks_the_app(pgbouncer: int, mode: str) -> None:
    # The control: proves the test above can fail, i.e. that this PgBouncer really is in the trap's way.
    with new_database(mode, "postgresql") as database:
        with running_server(through(pgbouncer, database.url), env=POOL) as server:
            statuses = burst(server.url)
            log = server.stop()

    assert any(status >= 500 for status in statuses), statuses
    assert "prepared statement" in log, log
