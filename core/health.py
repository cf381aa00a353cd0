from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from core.db import IS_ASYNC, database_is_up, engine

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str
    mode: str
    dialect: str


UNAVAILABLE_EXAMPLE = {"status": "unavailable", "database": "unavailable", "mode": "sync", "dialect": "sqlite"}


@router.get(
    "/health",
    response_model=Health,
    summary="Check the app and its database",
    responses={503: {"model": Health, "description": "The database does not answer.",
                     "content": {"application/json": {"example": UNAVAILABLE_EXAMPLE}}}},
)
async def health() -> Health | JSONResponse:
    """Answer 200 when the database answers a `SELECT 1`, 503 when it does not."""
    up = await database_is_up()
    state = "ok" if up else "unavailable"
    report = Health(status=state, database=state, mode="async" if IS_ASYNC else "sync", dialect=engine.dialect.name)
    if up:
        return report
    return JSONResponse(report.model_dump(), status_code=503)
