"""Exception handlers: every error is JSON with a `detail`, and no traceback or SQL text reaches a client."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from core.db import DATABASE_DOWN_ERRORS

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "Database unavailable"
INTERNAL_ERROR = "Internal Server Error"
PRECONDITION_FAILED = "The item has changed since you read it: read it again"

# A table or column the models use that the database lacks: PostgreSQL's undefined_table and undefined_column
# (SQLSTATE), SQLite's messages. The database is up and the request is fine: the schema is behind the code.
UNDEFINED_TABLE_OR_COLUMN = {"42P01", "42703"}
SQLITE_MISSING = ("no such table", "no such column", "has no column named")


class Error(BaseModel):
    """Every error but a 422 (whose detail lists the invalid fields): one schema, so generated clients get it typed."""

    detail: str = Field(description="What went wrong, in one sentence.")


def error_response(description: str, detail: str) -> dict[str, Any]:
    """An error response for the OpenAPI schema: the Error model, with an example."""
    return {
        "model": Error,
        "description": description,
        "content": {"application/json": {"example": {"detail": detail}}},
    }


# What any route that reads a body can answer besides 422.
BAD_BODY = {
    400: error_response(
        "The body could not be read, or the database rejected a value.", "A value was rejected by the database"
    ),
    413: error_response("The body is larger than the limit (1 MiB by default).", "Request body too large"),
}
# The error every database-backed route can answer with.
UNAVAILABLE_RESPONSE = {503: error_response("The database cannot be reached; retry later.", DATABASE_UNAVAILABLE)}


@contextmanager
def duplicate_is_conflict(detail: str, constraint: str, sqlite_column: str) -> Iterator[None]:
    """Turn the violation of one unique constraint into a 409 with `detail`, even when two requests race.

    PostgreSQL names the constraint in its message ("uq_item_title"), SQLite the column ("item.title")."""
    try:
        yield
    except IntegrityError as exc:
        if constraint not in str(exc.orig) and f"UNIQUE constraint failed: {sqlite_column}" not in str(exc.orig):
            raise
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=detail) from exc


def error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def is_schema_mismatch(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return sqlstate in UNDEFINED_TABLE_OR_COLUMN or any(words in str(exc.orig) for words in SQLITE_MISSING)


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """Map a database error to a status code; the log gets the error's type, the client a plain detail."""
    if isinstance(exc, DBAPIError) and is_schema_mismatch(exc):
        logger.error(
            "%s %s: the database schema is behind the models (%s): run the migrations (`alembic upgrade head`), "
            "after writing one if the model change has none (`alembic revision --autogenerate`)",
            request.method,
            request.url.path,
            exc.orig,
        )
        return error(500, INTERNAL_ERROR)
    # OperationalError and InterfaceError are how the drivers report a refused or lost connection.
    lost = isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
    if lost or isinstance(exc, DATABASE_DOWN_ERRORS):
        logger.warning("%s %s: database unavailable (%s)", request.method, request.url.path, type(exc).__name__)
        return error(503, DATABASE_UNAVAILABLE)
    if isinstance(exc, IntegrityError):
        return error(409, "The request conflicts with existing data")
    if isinstance(exc, DataError):
        return error(400, "A value was rejected by the database")
    logger.exception("%s %s: database error", request.method, request.url.path)
    return error(500, INTERNAL_ERROR)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, safe for any input: NaN or a lone surrogate in the body cannot be echoed back as JSON."""
    errors = jsonable_encoder(exc.errors())
    try:
        return JSONResponse({"detail": errors}, status_code=422)
    except (UnicodeEncodeError, ValueError):
        without_input = [{key: value for key, value in e.items() if key not in ("input", "ctx")} for e in errors]
        return JSONResponse({"detail": without_input}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s: unexpected error", request.method, request.url.path)
    return error(500, INTERNAL_ERROR)


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    for error_type in (SQLAlchemyError, *DATABASE_DOWN_ERRORS):
        app.add_exception_handler(error_type, database_error)
    app.add_exception_handler(Exception, unexpected_error)
