"""The long load run: prints throughput, latency, status counts, memory and leftover connections.

    python -m tests.load                                    # sync mode, SQLite file in a temporary folder
    python -m tests.load --database-url postgresql://postgres@127.0.0.1:5432/loadtest
    python -m tests.load --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/loadtest

A real uvicorn process on 127.0.0.1 with pool 5 + overflow 10; 200 concurrent clients mix reads, writes
and error paths (404, 409, 422). Bounded: --requests in total, and never longer than --seconds.
The PostgreSQL database must exist; the run adds rows to it.
"""

import argparse
import asyncio
import tempfile
from pathlib import Path

from sqlalchemy import make_url

from tests.live import busy_connections, mixed_load, rss_kib, running_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup-requests", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        database_url = args.database_url or f"sqlite:///{Path(folder) / 'load.db'}"
        env = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10"}
        with running_server(database_url, env=env) as server:
            pid = server.process.pid
            rss_start = rss_kib(pid)
            warmup = asyncio.run(mixed_load(server.url, args.clients, args.warmup_requests, args.seconds))
            rss_warm = rss_kib(pid)
            result = asyncio.run(mixed_load(server.url, args.clients, args.requests, args.seconds))
            rss_end = rss_kib(pid)
            busy = busy_connections(database_url)

    total = sum(result.statuses.values())
    server_errors = sum(n for status, n in result.statuses.items() if status >= 500)
    print(f"database        {make_url(database_url).drivername}, pool 5 + overflow 10, {args.clients} clients")
    print(f"requests        {total} in {result.seconds:.1f} s (+{sum(warmup.statuses.values())} warm-up)")
    print(f"throughput      {total / result.seconds:.0f} req/s")
    print(f"latency         p50 {result.percentile(0.5) * 1000:.1f} ms, p99 {result.percentile(0.99) * 1000:.1f} ms")
    print(f"statuses        {dict(sorted(result.statuses.items()))}, 5xx: {server_errors}")
    print(
        f"rss             start {rss_start / 1024:.1f} MiB, after warm-up {rss_warm / 1024:.1f} MiB, "
        f"after {total} more {rss_end / 1024:.1f} MiB ({(rss_end - rss_warm) / rss_warm:+.1%})"
    )
    if busy is not None:
        print(f"busy db conns   {busy} (connections in a transaction or query after the run)")
    if server_errors or total < args.requests:
        raise SystemExit("FAILED: server errors or unanswered requests")


if __name__ == "__main__":
    main()
