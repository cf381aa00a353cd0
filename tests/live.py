"""A real uvicorn server process and a TCP proxy that can cut the database off: for the fault and load tests.

Everything listens on 127.0.0.1 only, and every wait here is bounded.
"""

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import IO

import httpx
import psycopg
from sqlalchemy import make_url

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def append_only_log() -> IO[str]:
    """A temporary file for a server's log (a full pipe would block the server).

    Opened for appending (O_APPEND), so reading it from the start never moves where the server writes.
    """
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - it lives as long as the server
    flags = fcntl.fcntl(log.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(log.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
    return log


class Server:
    """`uvicorn main:app` (or `app`, e.g. "tests.probe_app:app") in its own process, on a free loopback port."""

    def __init__(
        self,
        database_url: str | None,
        *,
        app: str = "main:app",
        workers: int = 1,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        access_log: bool = False,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port)]
        command += [] if access_log else ["--no-access-log"]
        command += ["--timeout-graceful-shutdown", "10"]
        if workers > 1:
            command += ["--workers", str(workers)]
        environment = {**(os.environ if base_env is None else base_env), **(env or {})}
        environment.pop("TEST_DATABASE_URL", None)
        if database_url is not None:
            environment["DATABASE_URL"] = database_url
        self.log = append_only_log()
        self.process = subprocess.Popen(
            command, cwd=cwd, env=environment, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_until_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):
            if time.monotonic() > deadline:
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not answer within {timeout} s:\n{self.stop()}")

    def wait_for_log(self, text: str, timeout: float = 15) -> None:
        """Wait until the server's log contains `text` (polled, bounded)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            if text in self.read_log():
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} not in the server's log within {timeout} s:\n{self.read_log()}")

    def probe(self) -> dict[str, int]:
        """GET /_probe of a server started as `tests.probe_app:app` (see tests/probe_app.py)."""
        return httpx.get(f"{self.url}/_probe", timeout=5).json()

    def wait_for_probe(self, condition: Callable[[dict[str, int]], bool], timeout: float = 10) -> dict[str, int]:
        """Poll /_probe until `condition` holds (bounded); returns the last reading."""
        deadline = time.monotonic() + timeout
        reading: dict[str, int] = {}
        for _ in range(int(timeout / 0.01) + 1):
            reading = self.probe()
            if condition(reading) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert condition(reading), f"the server's probe never showed the expected state: {reading}"
        return reading

    def stop(self, timeout: float = 15) -> str:
        """SIGTERM (a graceful shutdown: lifespan end, engine disposed), SIGKILL if it hangs; returns the log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.read_log()

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextmanager
def running_server(database_url: str, **options: object) -> Iterator[Server]:
    server = Server(database_url, **options)  # type: ignore[arg-type]
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


class TcpProxy:
    """Forwards 127.0.0.1:port to the database, until the test says otherwise.

    `cut()` drops every connection and refuses new ones (a database that is down: fails at once).
    `black_hole()` drops every connection and accepts new ones that never get an answer (a database host
    that does not answer: only a connect timeout ends the wait). `restore()` forwards again.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "forward"
        self.connections: set[socket.socket] = set()
        self.swallowed: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept_forever, daemon=True).start()

    @property
    def is_cut(self) -> bool:
        return self.mode == "cut"

    def accept_forever(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            if self.mode == "black_hole":
                # Kept open and never read: the client's connect succeeds, its first message goes unanswered.
                with self.lock:
                    self.swallowed.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.connections |= {client, upstream}
            threading.Thread(target=self.pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client), daemon=True).start()

    def pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                destination.sendall(chunk)
        except OSError:
            pass
        finally:
            self.drop(source, destination)

    def drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self.lock:
                self.connections.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def drop_all(self) -> None:
        with self.lock:
            live = [*self.connections, *self.swallowed]
            self.swallowed.clear()
        self.drop(*live)

    def cut(self) -> None:
        self.mode = "cut"
        self.drop_all()

    def black_hole(self) -> None:
        """From now on connections are accepted and never answered; the forwarded ones are dropped."""
        self.mode = "black_hole"
        self.drop_all()

    def restore(self) -> None:
        self.mode = "forward"

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def mixed_load(base_url: str, clients: int, total_requests: int, seconds: float) -> LoadResult:
    """`clients` concurrent clients share `total_requests`, each cycling through reads, writes and errors.

    Stops after `total_requests` or `seconds`, whichever comes first.
    """
    result = LoadResult()
    tickets = iter(range(total_requests))
    serial = count()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=seconds) as http:
        first = (await http.post("/items/", json={"title": f"load-seed-{time.time_ns()}"})).json()

        def request(step: int):  # type: ignore[no-untyped-def]
            match step % 6:
                case 0:
                    return http.get(f"/items/{first['id']}")
                case 1:
                    return http.get("/items/", params={"limit": 20})
                case 2:
                    return http.post("/items/", json={"title": f"load-{time.time_ns()}-{next(serial)}"})
                case 3:
                    return http.post("/items/", json={"title": first["title"]})
                case 4:
                    return http.get("/items/987654321")
                case _:
                    return http.patch(f"/items/{first['id']}", json={"title": None})

        async def one_client(number: int) -> None:
            for ticket in tickets:
                if time.monotonic() > deadline:
                    return
                started = time.monotonic()
                response = await request(number + ticket)
                result.latencies.append(time.monotonic() - started)
                result.statuses[response.status_code] += 1

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one_client(n) for n in range(clients))), seconds + 10)
        result.seconds = time.monotonic() - started
    return result


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def admin_connection(database_url: str, database: str | None = None) -> psycopg.Connection:
    """An autocommit psycopg connection to the server of `database_url` (to `database` if given)."""
    url = make_url(database_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def busy_connections(database_url: str) -> int | None:
    """Connections to the database that are in a transaction or a query (PostgreSQL only, else None)."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    with admin_connection(database_url, database="postgres") as admin:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state <> 'idle'"
        return admin.execute(query, (url.database,)).fetchone()[0]


def backends(database_url: str, *, wait_event_type: str | None = None, wait_event: str | None = None) -> list[int]:
    """Pids of the server processes (backends) connected to the database of `database_url` (PostgreSQL),
    only those waiting on `wait_event_type`/`wait_event` if given; the asking connection is not counted."""
    url = make_url(database_url)
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    parameters: list[str | None] = [url.database]
    if wait_event_type is not None:
        query += " AND wait_event_type = %s"
        parameters.append(wait_event_type)
    if wait_event is not None:
        query += " AND wait_event = %s"
        parameters.append(wait_event)
    with admin_connection(database_url, database="postgres") as admin:
        return [row[0] for row in admin.execute(query, parameters).fetchall()]


def wait_for_backends(
    database_url: str, condition: Callable[[list[int]], bool], timeout: float = 15, **filters: str
) -> list[int]:
    """Poll `backends(database_url, **filters)` until `condition` holds (bounded in count and time)."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    for _ in range(int(timeout / 0.02) + 1):
        found = backends(database_url, **filters)
        if condition(found) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return found
