"""Assembles the app: lifespan, error handlers, middleware and routers. Run it with `uvicorn main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from core import db, health, schema
from core.body_limit import BodySizeLimit
from core.config import get_settings
from core.docs import add_offline_docs
from core.errors import add_exception_handlers
from items import item
from tags import tag

DESCRIPTION = """
Create, list, update and delete items. Every request gets its own database session; writes commit
before the response is sent, and any failure rolls back.

New here? Follow the [workshop](/workshop) (`WORKSHOP.md` in the repository), step by step.
"""

TAGS = [
    {
        "name": "items",
        "description": "The items: a unique title and an optional description, with server-set id and timestamps.",
    },
    {"name": "tags", "description": "Tags: names shared by items, created when an item first uses them."},
    {"name": "health", "description": "Is the app up, and does its database answer?"},
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Migrate before serving (or, when migrations are a separate step, refuse to serve a database behind).
    await schema.prepare_database(db.engine, get_settings())
    yield
    await db.dispose_engine(db.engine)


def create_app(async_mode: bool = db.IS_ASYNC) -> FastAPI:
    """Build the app; the mode follows DATABASE_URL (tests build both)."""
    app = FastAPI(
        title="Items API",
        version="1.0.0",
        summary="A to-do list of items, and a reference for database sessions in FastAPI + SQLModel.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Operation ids are the route functions' names, so a generated client has `read_item`, not
        # `read_item_items__item_id__get`.
        generate_unique_id_function=lambda route: route.name,
    )
    add_offline_docs(app)
    add_exception_handlers(app)
    # Larger bodies get a JSON 413 as soon as they pass the limit, without being read whole.
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_body_bytes)
    app.include_router(health.router)
    app.include_router(item.async_router if async_mode else item.router)
    app.include_router(tag.async_router if async_mode else tag.router)
    return app


app = create_app()
