"""Assembles the app: lifespan, error handlers, middleware and routers. Run it with `uvicorn main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from core import db, health
from core.body_limit import BodySizeLimit
from core.config import get_settings
from core.errors import add_exception_handlers
from items import item


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await db.create_db_and_tables()
    yield
    await db.dispose_engine()


def create_app(async_mode: bool = db.IS_ASYNC) -> FastAPI:
    """Build the app; the mode follows DATABASE_URL (tests build both)."""
    app = FastAPI(title="Items API", version="1.0.0", lifespan=lifespan)
    add_exception_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_body_bytes)
    app.include_router(health.router)
    app.include_router(item.async_router if async_mode else item.router)
    return app


app = create_app()
