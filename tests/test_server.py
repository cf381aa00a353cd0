"""A real uvicorn process on 127.0.0.1: races, load above the pool size, a database that goes away, shutdown.

Each test is bounded in requests and seconds, and each one that guards a feature fails whenever that feature
is removed: where timing would decide, the test holds a database lock or shrinks the worker-thread pool
(tests/probe_app.py) so that the bad case is certain. The long load run with figures is `python -m tests.load`.
"""

import asyncio
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from tests import live
from tests.conftest import Database, new_database
from tests.live import Server, TcpProxy, busy_connections, mixed_load, running_server, wait_for_backends
from tests.probe_app import PROBE_HOLDING

POOL = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10"}
# The app with test-only probes (tests/probe_app.py): GET /_probe, a smaller worker-thread pool, a pause at exit.
PROBE_APP = "tests.probe_app:app"
# One pooled connection and no overflow: a second session at the same time would have to wait in the pool.
POOL_TIMEOUT = 1
ONE_CONNECTION = {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": str(POOL_TIMEOUT)}
ONE_THREAD = {"PROBE_WORKER_THREADS": "1"}
# The key of the advisory lock under which the app creates (or migrates) the schema at start-up.
SCHEMA_LOCK = 20261125
TITLE_TAKEN = "An item with this title already exists"


def test_health_reports_the_mode_and_dialect_of_the_database_url(server_database: Database) -> None:
    with running_server(server_database.url) as server:
        body = httpx.get(f"{server.url}/health").json()

    assert body == {
        "status": "ok",
        "database": "ok",
        "schema": "ok",
        "mode": server_database.mode,
        "dialect": server_database.backend,
    }


def test_concurrent_creates_with_the_same_title_give_exactly_one_201(server_database: Database) -> None:
    with running_server(server_database.url) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(lambda _: client.post("/items/", json={"title": "Race"}), range(40)))
        listing = client.get("/items/")

    assert Counter(response.status_code for response in responses) == {201: 1, 409: 39}
    # The title's own 409, not the generic one for any other IntegrityError: the race is told apart too.
    conflicts = [response.json() for response in responses if response.status_code == 409]
    assert conflicts == [{"detail": TITLE_TAKEN}] * 39
    assert listing.headers["x-total-count"] == "1"
    assert [item["title"] for item in listing.json()] == ["Race"]


def test_200_concurrent_clients_above_the_pool_size_all_get_answers_without_5xx(server_database: Database) -> None:
    with running_server(server_database.url, env=POOL) as server:
        result = asyncio.run(mixed_load(server.url, clients=200, total_requests=1200, seconds=90))
        assert httpx.get(f"{server.url}/health").status_code == 200
        if server_database.backend == "postgresql":
            assert busy_connections(server_database.url) == 0

    assert sum(result.statuses.values()) == 1200
    assert set(result.statuses) == {200, 201, 404, 409, 422}, result.statuses


def test_one_pooled_connection_and_one_worker_thread_serve_100_concurrent_clients(server_database: Database) -> None:
    # The classic sync trap, made certain: with ONE worker thread, a request holding the only connection needs
    # that thread to finish (response validation runs in it) while the thread is stuck in another request
    # waiting for the connection. Sessions wait in the event loop instead (max_concurrency), so all succeed.
    with running_server(server_database.url, app=PROBE_APP, env=ONE_CONNECTION | ONE_THREAD) as server:
        assert server.probe()["threads"] == 1
        result = asyncio.run(mixed_load(server.url, clients=100, total_requests=600, seconds=30))

    assert sum(result.statuses.values()) == 600, result.statuses
    assert not [status for status in result.statuses if status >= 500], result.statuses


@contextmanager
def write_locked(database: Database, item_id: int) -> Iterator[None]:
    """Hold, until the block ends, a lock that an update of this item must wait for; then roll back.

    PostgreSQL: the item's row (SELECT ... FOR UPDATE). SQLite: the database's write lock (BEGIN IMMEDIATE).
    """
    if database.backend == "postgresql":
        with live.admin_connection(database.url) as connection, connection.transaction(force_rollback=True):
            connection.execute("SELECT id FROM item WHERE id = %s FOR UPDATE", (item_id,))
            yield
        return
    connection = sqlite3.connect(str(make_url(database.url).database), isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def wait_until_an_update_waits_for_the_lock(database: Database, server: Server, in_flight: int = 1) -> None:
    """Bounded: the app's UPDATE is stuck behind the test's lock (PostgreSQL: seen in pg_stat_activity)."""
    if database.backend == "postgresql":
        assert wait_for_backends(database.url, bool, wait_event_type="Lock"), "the update never waited for the lock"
    server.wait_for_probe(lambda probe: probe["in_flight"] == in_flight)


def test_a_request_holding_the_only_connection_gets_a_worker_thread_before_requests_that_want_it(
    postgresql_required: None,
) -> None:
    # Deterministic version of the deadlock, sync mode, ONE worker thread. A PUT holds the thread and the only
    # connection, stuck behind the test's row lock, while two GETs arrive. Without max_concurrency both GETs
    # queue for the thread; when the lock goes, the first GET takes the connection, then needs the thread again
    # (response validation) behind the second GET, which holds the thread waiting for the connection: a
    # deadlock until the pool timeout, and a 503. With it the GETs wait for a session, in the event loop.
    env = ONE_CONNECTION | ONE_THREAD
    with (
        new_database("sync", "postgresql") as database,
        running_server(database.url, app=PROBE_APP, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
        ThreadPoolExecutor(max_workers=3) as pool,
    ):
        item_id = client.post("/items/", json={"title": "before"}).json()["id"]
        with write_locked(database, item_id):
            put = pool.submit(client.put, f"/items/{item_id}", json={"title": "after"})
            wait_until_an_update_waits_for_the_lock(database, server)
            gets = [pool.submit(client.get, f"/items/{item_id}") for _ in range(2)]
            queued = server.wait_for_probe(lambda p: p["thread_waiting"] + p["session_waiting"] == 2)
        responses = [put.result(timeout=30), *(get.result(timeout=30) for get in gets)]

    assert queued["in_flight"] == 3, queued
    assert [response.status_code for response in responses] == [200, 200, 200], [r.text for r in responses]
    assert {response.json()["title"] for response in responses} == {"after"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_requests_waiting_longer_than_the_pool_timeout_for_the_only_connection_get_no_503(
    mode: str, postgresql_required: None
) -> None:
    # A PUT holds the only connection, stuck behind the test's row lock, for longer than DB_POOL_TIMEOUT while
    # three GETs wait. They wait for a session (max_concurrency), not in the pool, whose timeout would have
    # turned the wait into 503s at POOL_TIMEOUT seconds: none may answer until the lock goes, then all 200.
    with (
        new_database(mode, "postgresql") as database,
        running_server(database.url, app=PROBE_APP, env=ONE_CONNECTION) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        item_id = client.post("/items/", json={"title": "before"}).json()["id"]
        with write_locked(database, item_id):
            put = pool.submit(client.put, f"/items/{item_id}", json={"title": "after"})
            wait_until_an_update_waits_for_the_lock(database, server)
            gets = [pool.submit(client.get, f"/items/{item_id}") for _ in range(3)]
            server.wait_for_probe(lambda probe: probe["in_flight"] == 4)
            # The pool timeout is the clock here: past it, a request waiting in the pool has had its 503.
            answered_early, _ = wait(gets, timeout=POOL_TIMEOUT + 1.5, return_when=FIRST_COMPLETED)
        early = [future.result().status_code for future in answered_early]
        responses = [put.result(timeout=30), *(get.result(timeout=30) for get in gets)]

    assert early == [], f"answered while the connection was busy: {early}"
    assert [response.status_code for response in responses] == [200] * 4, [r.text for r in responses]
    assert {response.json()["title"] for response in responses} == {"after"}


@pytest.fixture(params=["sync", "async"])
def proxied_database(request: pytest.FixtureRequest, postgresql_required: None) -> tuple[Database, TcpProxy]:
    """A fresh PostgreSQL database reached through a proxy that the test can cut."""
    with new_database(request.param, "postgresql") as database:
        url = httpx.URL(database.url.replace("postgresql+", "http+", 1))
        proxy = TcpProxy(target_port=url.port or 5432)
        try:
            yield database, proxy
        finally:
            proxy.close()


def via(proxy: TcpProxy, database: Database) -> str:
    host_port = database.url.split("@", 1)[1].split("/", 1)[0]
    return database.url.replace(host_port, f"127.0.0.1:{proxy.port}", 1)


def timed(send) -> tuple[httpx.Response, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    response = send()
    return response, time.monotonic() - started


def test_database_outage_gives_fast_503s_and_the_app_recovers_by_itself(proxied_database) -> None:  # type: ignore[no-untyped-def]
    database, proxy = proxied_database
    env = POOL | {"DB_CONNECT_TIMEOUT": "2", "DB_POOL_TIMEOUT": "5"}
    with (
        running_server(via(proxy, database), env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        item = client.post("/items/", json={"title": "before"}).json()

        proxy.cut()
        health, health_seconds = timed(lambda: client.get("/health"))
        read, read_seconds = timed(lambda: client.get(f"/items/{item['id']}"))
        write, write_seconds = timed(lambda: client.post("/items/", json={"title": "during"}))

        assert health.status_code == 503
        assert health.json()["status"] == "unavailable" and health.json()["database"] == "unavailable"
        for response in (read, write):
            assert response.status_code == 503
            assert response.json() == {"detail": "Database unavailable"}
        assert max(health_seconds, read_seconds, write_seconds) < 8, "503 must come within the connect timeout"

        proxy.restore()
        deadline = time.monotonic() + 15
        for _ in range(75):  # at most 15 s
            if client.get("/health").status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert client.get("/health").status_code == 200, "the app did not recover by itself"

        assert client.get(f"/items/{item['id']}").json() == item
        assert [row["title"] for row in client.get("/items/").json()] == ["before"], "no write was half-applied"
        assert client.post("/items/", json={"title": "after"}).status_code == 201
        log = server.stop()

    assert "Traceback" not in log


def environment_without(*names: str) -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in names}


@pytest.mark.parametrize("connect_timeout", [1, None], ids=["DB_CONNECT_TIMEOUT=1", "default"])
def test_a_database_that_never_answers_gives_503s_within_the_connect_timeout(
    proxied_database,  # type: ignore[no-untyped-def]
    connect_timeout: int | None,
) -> None:
    # A host that accepts the connection and never answers (a black hole): only the connect timeout ends the
    # wait. psycopg counts whole seconds, at least 2 (so 1 s is 2 s there); the default is 5 s. Each 503 takes
    # at least a second (a refused connection would fail at once: the black hole was hit) and less than
    # twice the timeout: 4 s, and 9.5 s with the default (a default raised to 30 s fails here).
    database, proxy = proxied_database
    env = POOL if connect_timeout is None else POOL | {"DB_CONNECT_TIMEOUT": str(connect_timeout)}
    shortest, longest = 0.9, (4.0 if connect_timeout == 1 else 9.5)
    # The app creates its tables at start-up: it starts on a database that answers, then loses it.
    server = Server(via(proxy, database), env=env, base_env=environment_without("DB_CONNECT_TIMEOUT"))
    try:
        server.wait_until_ready()
        with httpx.Client(base_url=server.url, timeout=longest + 5) as client:
            item_id = client.post("/items/", json={"title": "kept"}).json()["id"]
            proxy.black_hole()
            # The pooled connections were cut with the switch: the database has closed its side of them.
            assert wait_for_backends(database.url, lambda pids: not pids) == [], "the pool's connections live on"
            with ThreadPoolExecutor(max_workers=2) as pool:
                health = pool.submit(timed, lambda: client.get("/health"))
                read = pool.submit(timed, lambda: client.get(f"/items/{item_id}"))
                (health_response, health_seconds), (read_response, read_seconds) = health.result(), read.result()
    finally:
        log = server.stop()

    assert health_response.status_code == 503, health_response.text
    assert health_response.json()["database"] == "unavailable"
    assert read_response.status_code == 503, read_response.text
    assert read_response.json() == {"detail": "Database unavailable"}
    for seconds in (health_seconds, read_seconds):
        assert shortest <= seconds < longest, (
            f"{health_seconds=:.2f} {read_seconds=:.2f}, expected {shortest}..{longest}"
        )
    assert "Traceback" not in log


def test_start_up_waits_for_the_schema_lock_another_process_holds(postgresql_required: None) -> None:
    # Several workers may start at once on an empty database: each creates (or migrates) the schema under one
    # advisory lock, so they take turns. Here the test holds that lock: the server must wait for it, in the
    # same database, and start as soon as it is released.
    with new_database("sync", "postgresql") as database, live.admin_connection(database.url) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        server = Server(database.url)
        try:
            waiting = wait_for_backends(database.url, bool, wait_event_type="Lock", wait_event="advisory")
            assert waiting, f"the server never waited for the advisory lock {SCHEMA_LOCK}:\n{server.read_log()}"
            assert server.process.poll() is None
            with pytest.raises(httpx.ConnectError):  # uvicorn listens only once start-up is complete
                httpx.get(f"{server.url}/health", timeout=5)
            assert "Application startup complete" not in server.read_log()

            holder.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
            server.wait_until_ready(timeout=15)
            created = httpx.post(f"{server.url}/items/", json={"title": "one"})
        finally:
            log = server.stop()

    assert created.status_code == 201, created.text
    assert "Traceback" not in log


def open_files(pid: int, prefix: str) -> list[str]:
    """The files under `prefix` that a process has open (Linux)."""
    names = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            names.append(os.readlink(fd))
        except OSError:
            continue
    return [name for name in names if name.startswith(prefix)]


def stored_title(database: Database, item_id: int) -> str:
    if database.backend == "postgresql":
        with live.admin_connection(database.url) as connection:
            return connection.execute("SELECT title FROM item WHERE id = %s", (item_id,)).fetchone()[0]
    with sqlite3.connect(str(make_url(database.url).database)) as connection:
        return connection.execute("SELECT title FROM item WHERE id = ?", (item_id,)).fetchone()[0]


def test_shutdown_lets_the_request_in_flight_finish_then_releases_the_database(
    server_database: Database, tmp_path: Path
) -> None:
    # An update stuck behind the test's lock is in flight when SIGTERM comes. The lock is released only once
    # the server has begun shutting down: the update must still get its 200 and be stored. Then the lifespan
    # disposes the engine: the process, held alive by the probe right after, has no connection (PostgreSQL)
    # nor open database file (SQLite) left. Then it exits as uvicorn does after a graceful SIGTERM.
    database = server_database
    release = tmp_path / "release"
    env = POOL | {"SQLITE_BUSY_TIMEOUT_MS": "30000", "PROBE_HOLD_AFTER_SHUTDOWN": str(release)}
    server = Server(database.url, app=PROBE_APP, env=env)
    try:
        server.wait_until_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(max_workers=1) as pool:
            item_id = client.post("/items/", json={"title": "before"}).json()["id"]
            with write_locked(database, item_id):
                put: Future[httpx.Response] = pool.submit(client.put, f"/items/{item_id}", json={"title": "after"})
                wait_until_an_update_waits_for_the_lock(database, server)
                server.process.send_signal(signal.SIGTERM)
                server.wait_for_log("Shutting down")
            response = put.result(timeout=30)

        server.wait_for_log(PROBE_HOLDING)
        if database.backend == "postgresql":
            left_open = wait_for_backends(database.url, lambda pids: not pids, timeout=5)
        else:
            left_open = open_files(server.process.pid, str(make_url(database.url).database))
        release.touch()
        exit_code = server.process.wait(timeout=20)
    finally:
        release.touch()
        log = server.stop()

    assert response.status_code == 200, response.text
    assert response.json()["title"] == "after"
    assert stored_title(database, item_id) == "after"
    assert left_open == [], f"still open after the lifespan's shutdown: {left_open}"
    # uvicorn re-raises the SIGTERM once its graceful shutdown is done: the exit status of a SIGTERM.
    assert exit_code == -signal.SIGTERM, log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
    if database.backend == "postgresql":
        assert wait_for_backends(database.url, lambda pids: not pids) == [], "connections outlived the process"


def test_request_body_over_1_mib_streamed_without_length_is_refused_with_413(server_database: Database) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield b"x" * 32768

    with running_server(server_database.url) as server:
        response = httpx.post(f"{server.url}/items/", content=chunks(), headers={"content-type": "application/json"})
        count_after = httpx.get(f"{server.url}/items/").headers["x-total-count"]

    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}
    assert count_after == "0"


def test_four_workers_starting_at_once_on_an_empty_postgresql_database_all_come_up(postgresql_required: None) -> None:
    with new_database("sync", "postgresql") as database, running_server(database.url, workers=4) as server:
        assert httpx.post(f"{server.url}/items/", json={"title": "one"}).status_code == 201
        log = server.stop()

    assert log.count("Application startup complete") == 4, log
    assert "Traceback" not in log
