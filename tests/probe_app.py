"""`main:app` with test-only probes around it: `uvicorn tests.probe_app:app`, for tests/test_server.py.

The app itself is untouched; this ASGI wrapper only adds, each when its environment variable is set:

- PROBE_WORKER_THREADS=N: anyio's worker-thread limit (the pool `def` routes and sync dependencies run in,
  40 by default) is N in this process, set before the app's start-up. A small N makes thread starvation
  certain instead of a matter of timing.
- PROBE_HOLD_AFTER_SHUTDOWN=path: once the app's lifespan has shut down (the engine disposed), the process
  logs PROBE_HOLDING and waits, at most HOLD_SECONDS, until that file exists. A test can then look at the
  live process after the app has cleaned up, before exiting closes everything anyway.

And always: GET /_probe, answered here without touching the app, threads or the database (so it answers
even while every worker thread is stuck): {"in_flight": app requests in flight, "thread_waiting": tasks
waiting for a worker thread, "session_waiting": tasks waiting at a dependency's max_concurrency limit}.
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio.to_thread

from main import app as main_app

HOLD_SECONDS = 30
PROBE_HOLDING = "PROBE_HOLDING: the app's lifespan has shut down; waiting for the test"

logger = logging.getLogger("uvicorn.error")
in_flight = 0


def session_waiting() -> int:
    """Tasks waiting at FastAPI's per-dependency semaphores (`Depends(..., max_concurrency=...)`)."""
    try:
        from fastapi.concurrency import _dependency_semaphores
    except ImportError:
        return 0
    semaphores = _dependency_semaphores.get(None) or {}
    return sum(semaphore.statistics().tasks_waiting for semaphore in list(semaphores.values()))


def probe() -> dict[str, int]:
    threads = anyio.to_thread.current_default_thread_limiter().statistics()
    return {
        "in_flight": in_flight,
        "thread_waiting": threads.tasks_waiting,
        "threads": int(threads.total_tokens),
        "session_waiting": session_waiting(),
    }


async def answer_probe(send: Any) -> None:
    body = json.dumps(probe()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def hold_until_released(path: Path) -> None:
    logger.info(PROBE_HOLDING)
    deadline = time.monotonic() + HOLD_SECONDS
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global in_flight
    if scope["type"] == "lifespan":
        if threads := os.environ.get("PROBE_WORKER_THREADS"):
            anyio.to_thread.current_default_thread_limiter().total_tokens = int(threads)
        hold = os.environ.get("PROBE_HOLD_AFTER_SHUTDOWN")

        async def send_after_hold(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.shutdown.complete" and hold:
                await hold_until_released(Path(hold))
            await send(message)

        await main_app(scope, receive, send_after_hold)
        return
    if scope["type"] == "http" and scope["path"] == "/_probe":
        await answer_probe(send)
        return
    in_flight += 1
    try:
        await main_app(scope, receive, send)
    finally:
        in_flight -= 1
