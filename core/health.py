"""GET /health: does the database answer, and is its schema the one the app needs?"""

import logging

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import db, schema
from core.errors import is_schema_mismatch

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description='"ok" when the database answers and its schema is the one the app needs.')
    database: str = Field(description='"ok" or "unavailable".')
    # ("schema" is also the name of a pydantic method, hence the alias.)
    schema_state: str = Field(
        alias="schema", description='"ok", "behind" (run the migrations), "differs" or "unknown".'
    )
    mode: str
    dialect: str


UNAVAILABLE_EXAMPLE = {
    "status": "unavailable",
    "database": "ok",
    "schema": "behind",
    "mode": "sync",
    "dialect": "sqlite",
}
VERSION = text("SELECT version_num FROM alembic_version")


def read_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return connection.execute(VERSION).scalar()


async def revision(engine: Engine | AsyncEngine) -> str | None:
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as connection:
            return (await connection.execute(VERSION)).scalar()
    return await anyio.to_thread.run_sync(read_revision, engine)


async def check(engine: Engine | AsyncEngine) -> tuple[str, str]:
    """The database's state ("ok" or "unavailable") and its schema's ("ok", "behind", "differs" or "unknown")."""
    try:
        current = await revision(engine)
    except (DBAPIError, *db.DATABASE_DOWN_ERRORS) as exc:
        if isinstance(exc, DBAPIError) and is_schema_mismatch(exc):
            return "ok", "behind"  # it answers, but has no migration history yet
        logger.warning("Database check failed: %s", type(exc).__name__)
        return "unavailable", "unknown"
    if current != schema.head_revision():
        return "ok", "behind"
    return "ok", "differs" if schema.found_at_start else "ok"


@router.get(
    "/health",
    response_model=Health,
    summary="Check the app and its database",
    responses={
        503: {
            "model": Health,
            "description": "The database does not answer, or its schema is not the one the app needs.",
            "content": {"application/json": {"example": UNAVAILABLE_EXAMPLE}},
        }
    },
)
async def health() -> Health | JSONResponse:
    """Answer 200 when the database answers and is at the app's migration revision, 503 when not."""
    engine = db.engine
    database, schema_state = await check(engine)
    status = "ok" if database == schema_state == "ok" else "unavailable"
    mode = "async" if isinstance(engine, AsyncEngine) else "sync"
    report = Health(status=status, database=database, schema=schema_state, mode=mode, dialect=engine.dialect.name)
    if status == "ok":
        return report
    return JSONResponse(report.model_dump(by_alias=True), status_code=503)
