from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from core import db

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
    responses={
        503: {
            "model": Health,
            "description": "The database does not answer.",
            "content": {"application/json": {"example": UNAVAILABLE_EXAMPLE}},
        }
    },
)
async def health() -> Health | JSONResponse:
    """Answer 200 when the database answers a `SELECT 1`, 503 when it does not."""
    up = await db.database_is_up()
    state = "ok" if up else "unavailable"
    mode = "async" if db.IS_ASYNC else "sync"
    report = Health(status=state, database=state, mode=mode, dialect=db.engine.dialect.name)
    if up:
        return report
    return JSONResponse(report.model_dump(), status_code=503)
