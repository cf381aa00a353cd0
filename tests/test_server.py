"""A real uvicorn process on 127.0.0.1: races, load above the pool size, a database that goes away, shutdown.

Each test is bounded in requests and seconds. The long load run with figures is `python -m tests.load`.
"""

import asyncio
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Database, new_database
from tests.live import Server, TcpProxy, busy_connections, mixed_load, running_server

POOL = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10"}


def test_health_reports_the_mode_and_dialect_of_the_database_url(server_database: Database) -> None:
    with running_server(server_database.url) as server:
        body = httpx.get(f"{server.url}/health").json()

    assert body == {
        "status": "ok",
        "database": "ok",
        "mode": server_database.mode,
        "dialect": server_database.backend,
    }


def test_concurrent_creates_with_the_same_title_give_exactly_one_201(server_database: Database) -> None:
    with running_server(server_database.url) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(lambda _: client.post("/items/", json={"title": "Race"}).status_code, range(40)))
        total = client.get("/items/").headers["x-total-count"]

    assert Counter(statuses) == {201: 1, 409: 39}
    assert total == "1"


def test_200_concurrent_clients_above_the_pool_size_all_get_answers_without_5xx(server_database: Database) -> None:
    with running_server(server_database.url, env=POOL) as server:
        result = asyncio.run(mixed_load(server.url, clients=200, total_requests=1200, seconds=90))
        assert httpx.get(f"{server.url}/health").status_code == 200
        if server_database.backend == "postgresql":
            assert busy_connections(server_database.url) == 0

    assert sum(result.statuses.values()) == 1200
    assert set(result.statuses) == {200, 201, 404, 409, 422}, result.statuses


def test_one_pooled_connection_serves_100_concurrent_clients_without_deadlock(server_database: Database) -> None:
    # The classic sync trap, made certain: 40 worker threads all waiting for the one connection, held by
    # a request that needs a thread to finish. Sessions wait in the event loop instead, so all succeed.
    env = {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": "3"}
    with running_server(server_database.url, env=env) as server:
        result = asyncio.run(mixed_load(server.url, clients=100, total_requests=600, seconds=60))

    assert sum(result.statuses.values()) == 600
    assert not [status for status in result.statuses if status >= 500], result.statuses


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
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app did not recover by itself"
            time.sleep(0.2)

        assert client.get(f"/items/{item['id']}").json() == item
        assert [row["title"] for row in client.get("/items/").json()] == ["before"], "no write was half-applied"
        assert client.post("/items/", json={"title": "after"}).status_code == 201
        log = server.stop()

    assert "Traceback" not in log


def test_shutdown_with_requests_in_flight_answers_or_closes_them_and_exits_cleanly(server_database: Database) -> None:
    server = Server(server_database.url, env=POOL)
    try:
        server.wait_until_ready()
        with httpx.Client(base_url=server.url, timeout=20) as client:
            for n in range(100):
                client.post("/items/", json={"title": f"row {n}"})

            def list_items() -> int | str:
                try:
                    return client.get("/items/").status_code
                except httpx.TransportError as error:
                    return type(error).__name__

            with ThreadPoolExecutor(max_workers=30) as pool:
                in_flight = [pool.submit(list_items) for _ in range(60)]
                time.sleep(0.05)
                server.process.send_signal(signal.SIGTERM)
                outcomes = [future.result(timeout=30) for future in in_flight]
        exit_code = server.process.wait(timeout=20)
    finally:
        log = server.stop()

    # uvicorn re-raises the SIGTERM once its graceful shutdown is done, hence -15 rather than 0.
    assert exit_code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
    assert all(outcome == 200 or isinstance(outcome, str) for outcome in outcomes), outcomes
    assert not any(isinstance(outcome, int) and outcome >= 500 for outcome in outcomes)


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
