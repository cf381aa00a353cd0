"""The items feature: its models, its statements and its routes, in sync and async mode."""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.routing import APIRoute
from pydantic import Field as Rules
from sqlalchemy import BigInteger, Integer, Row, UniqueConstraint
from sqlalchemy.orm import declared_attr, object_session
from sqlmodel import Field, SQLModel, func, select
from sqlmodel.sql.expression import Select

from core.db import AsyncSessionDep, SessionDep, UTCDateTime
from core.errors import UNAVAILABLE_RESPONSE, duplicate_is_conflict, error_response
from core.etags import CHANGED_SINCE, NOT_MODIFIED, IfMatch, IfNoneMatch, etag, not_modified, require_match

# No NUL characters: PostgreSQL cannot store them, and the API must behave the same on every database.
NO_NUL = r"^[^\x00]*$"

# The rules for each client field, declared once for ItemBase (POST, PUT) and ItemUpdate (PATCH).
Title = Annotated[
    str,
    Rules(
        min_length=1,
        max_length=100,
        pattern=NO_NUL,
        description="1 to 100 characters, unique among all items.",
        examples=["Buy milk"],
    ),
]
Description = Annotated[
    str | None,
    Rules(max_length=1000, pattern=NO_NUL, description="Up to 1000 characters, or null.", examples=["Two litres"]),
]


ITEM_EXAMPLE = {
    "id": 1,
    "title": "Buy milk",
    "description": "Two litres",
    "version": 1,
    "created_at": "2026-11-25T09:30:00Z",
    "updated_at": "2026-11-25T09:30:00Z",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class ItemBase(SQLModel):
    """The fields a client sends: the body of POST and PUT."""

    model_config = {"json_schema_extra": {"examples": [{"title": "Buy milk", "description": "Two litres"}]}}  # type: ignore[assignment]

    title: Title
    description: Description = None


class ItemUpdate(SQLModel):
    """The body of PATCH: every field optional, and only the fields sent are changed."""

    model_config = {"json_schema_extra": {"examples": [{"description": None}]}}  # type: ignore[assignment]

    # The type stays `str`, so `"title": null` is a 422; leaving title out keeps the current one.
    title: Title = None  # type: ignore[assignment]
    description: Description = None


class Item(ItemBase, table=True):
    """An item as stored, and as returned to the client."""

    # A named constraint, so a violation can be told apart from any other; and on SQLite, AUTOINCREMENT
    # so the id of a deleted item is never given to a new one (PostgreSQL's sequences never reuse ids).
    __table_args__ = (UniqueConstraint("title", name="uq_item_title"), {"sqlite_autoincrement": True})
    # Every field appears in every response, so the response schema marks them all as required.
    model_config = {  # type: ignore[assignment]
        "json_schema_serialization_defaults_required": True,
        "json_schema_extra": {"examples": [ITEM_EXAMPLE]},
    }

    # 64-bit ids on PostgreSQL; SQLite's INTEGER PRIMARY KEY is 64-bit already (and must be spelled so).
    id: int | None = Field(
        default=None,
        primary_key=True,
        sa_type=BigInteger().with_variant(Integer(), "sqlite"),
        description="Assigned by the server.",
    )
    # A required column added to a table with rows needs a server default: the database fills the old rows.
    version: int = Field(
        default=1, sa_column_kwargs={"server_default": "1"}, description="1 when created, one more with every change."
    )
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, description="UTC, set by the server.")
    updated_at: datetime = Field(
        default_factory=utc_now, sa_type=UTCDateTime, description="UTC, changes on every update."
    )

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        """Every UPDATE and DELETE says `WHERE id = ? AND version = <the version read>`, and counts version up:
        a row changed by another request in between is not overwritten (StaleDataError, a 412)."""
        return {"version_id_col": cls.__table__.c.version}  # type: ignore[attr-defined]


# --- What both modes share: statements, checks and the mapping of errors to status codes ---

NOT_FOUND = "Item not found"
TITLE_TAKEN = "An item with this title already exists"

count_items = select(func.count()).select_from(Item)


def page_of_items(skip: int, limit: int) -> Select[Any]:
    """A page of items in id order; every row also carries the count of all items (one query, one snapshot).

    The rows are plain columns, not ORM objects: a page that is only read needs no identity map or change
    tracking, and building those was most of a list's cost. The response model makes each row an Item.
    """
    columns = [*Item.__table__.columns, count_items.scalar_subquery().label("total")]
    return select(*columns).order_by(Item.id).offset(skip).limit(limit)


def found(item: Item | None) -> Item:
    if item is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=NOT_FOUND)
    return item


# A write reads the row with a lock (SELECT ... FOR UPDATE on PostgreSQL; SQLite writes one at a time): two
# writers take turns, so each applies its change whole to the state the other left (last writer wins).
LOCKED = {"with_for_update": True}


def current(item: Item | None, if_match: str | None) -> Item:
    """The item to change, if it exists (else 404) and is in the state the client saw (else 412)."""
    require_match(if_match, found(item).version)
    return item  # type: ignore[return-value]


def apply_changes(item: Item, changes: dict[str, Any]) -> bool:
    """Set the fields; True if that changed anything. A write that changes nothing writes nothing."""
    item.sqlmodel_update(changes)
    if not object_session(item).is_modified(item):  # type: ignore[union-attr]
        return False
    item.updated_at = utc_now()
    return True


def with_etag(item: Item, response: Response) -> Item:
    response.headers["ETag"] = etag(item.version)
    return item


def unique_title() -> AbstractContextManager[None]:
    """Around a commit: a title another item already has is a 409 (the database's constraint decides)."""
    return duplicate_is_conflict("title", TITLE_TAKEN)


ITEM_NOT_FOUND = {404: error_response("No item has this id.", NOT_FOUND)}
BAD_BODY = {
    400: error_response(
        "The body is not JSON text, or the database rejected a value.", "There was an error parsing the body"
    ),
    413: error_response("The body is larger than the limit (1 MiB by default).", "Request body too large"),
}
TITLE_CONFLICT = {409: error_response("Another item already has this title.", TITLE_TAKEN)}
WRITE_ERRORS = BAD_BODY | ITEM_NOT_FOUND | TITLE_CONFLICT | CHANGED_SINCE

# Ids and offsets are 64-bit in the database; a larger number is a 422, not a database error.
BIGINT_MAX = 2**63 - 1
ItemId = Annotated[int, Path(ge=-BIGINT_MAX - 1, le=BIGINT_MAX, description="The item's id.")]
PageSkip = Annotated[int, Query(ge=0, le=BIGINT_MAX, description="How many items to skip.")]
PageLimit = Annotated[int, Query(ge=1, le=100, description="How many items to return, at most 100.")]

# --- Sync mode (the default): `def` routes run in a worker thread with a `Session` ---

router = APIRouter(prefix="/items", tags=["items"], responses=UNAVAILABLE_RESPONSE)


@router.post("/", status_code=status.HTTP_201_CREATED, summary="Create an item", responses=BAD_BODY | TITLE_CONFLICT)
def create_item(item_in: ItemBase, session: SessionDep, response: Response) -> Item:
    """Create an item; the server assigns its id, version and timestamps and answers with its Location and ETag."""
    item = Item.model_validate(item_in)
    session.add(item)
    with unique_title():
        session.commit()
    response.headers["Location"] = f"/items/{item.id}"
    return with_etag(item, response)


# The route returns rows, so the response model is declared here rather than by the return type.
@router.get("/", summary="List items", response_model=list[Item])
def list_items(
    session: SessionDep, response: Response, skip: PageSkip = 0, limit: PageLimit = 100
) -> Sequence[Row[Any]]:
    """List items ordered by id, one page at a time; the X-Total-Count header gives the number of all items."""
    page = session.exec(page_of_items(skip, limit)).all()
    # A page past the end has no row to carry the count: only then is it a query of its own.
    response.headers["X-Total-Count"] = str(page[0].total if page else session.exec(count_items).one())
    return page


# Returning a Response (the 304) bypasses the response model, so it is declared here.
@router.get("/{item_id}", summary="Read an item", response_model=Item, responses=ITEM_NOT_FOUND | NOT_MODIFIED)
def read_item(
    item_id: ItemId, session: SessionDep, response: Response, if_none_match: IfNoneMatch = None
) -> Item | Response:
    """Return the item with this id and its ETag; 304 with no body if If-None-Match names that ETag."""
    item = found(session.get(Item, item_id))
    if not_modified(if_none_match, item.version):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag(item.version)})
    return with_etag(item, response)


@router.put("/{item_id}", summary="Replace an item", responses=WRITE_ERRORS)
def replace_item(
    item_id: ItemId, item_in: ItemBase, session: SessionDep, response: Response, if_match: IfMatch = None
) -> Item:
    """Replace every client field of the item (a description left out becomes null); If-Match makes it conditional."""
    item = current(session.get(Item, item_id, **LOCKED), if_match)
    if apply_changes(item, item_in.model_dump()):
        with unique_title():
            session.commit()
    return with_etag(item, response)


@router.patch("/{item_id}", summary="Update an item", responses=WRITE_ERRORS)
def update_item(
    item_id: ItemId, changes: ItemUpdate, session: SessionDep, response: Response, if_match: IfMatch = None
) -> Item:
    """Change only the fields sent (`"description": null` clears it); If-Match makes it conditional."""
    item = current(session.get(Item, item_id, **LOCKED), if_match)
    if apply_changes(item, changes.model_dump(exclude_unset=True)):
        with unique_title():
            session.commit()
    return with_etag(item, response)


@router.delete(
    "/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an item",
    responses=ITEM_NOT_FOUND | CHANGED_SINCE,
)
def delete_item(item_id: ItemId, session: SessionDep, if_match: IfMatch = None) -> None:
    """Delete the item with this id; If-Match makes it conditional."""
    session.delete(current(session.get(Item, item_id, **LOCKED), if_match))
    session.commit()


# --- Async mode: the same routes as `async def` with an `AsyncSession`; only the I/O differs ---

async_router = APIRouter()
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def same_route_as(sync_endpoint: Callable[..., Any]) -> Callable[[Endpoint], Endpoint]:
    """Register an async route with the path, response model, status, docs and error responses of its sync twin."""
    twin = next(route for route in router.routes if isinstance(route, APIRoute) and route.endpoint is sync_endpoint)

    def register(endpoint: Endpoint) -> Endpoint:
        async_router.add_api_route(
            twin.path,
            endpoint,
            methods=list(twin.methods),
            response_model=twin.response_model,
            status_code=twin.status_code,
            tags=twin.tags,
            summary=twin.summary,
            description=twin.description,
            responses=twin.responses,
            name=twin.name,
        )
        return endpoint

    return register


@same_route_as(create_item)
async def create_item_async(item_in: ItemBase, session: AsyncSessionDep, response: Response) -> Item:
    item = Item.model_validate(item_in)
    session.add(item)
    with unique_title():
        await session.commit()
    response.headers["Location"] = f"/items/{item.id}"
    return with_etag(item, response)


@same_route_as(list_items)
async def list_items_async(
    session: AsyncSessionDep, response: Response, skip: PageSkip = 0, limit: PageLimit = 100
) -> Sequence[Row[Any]]:
    page = (await session.exec(page_of_items(skip, limit))).all()
    response.headers["X-Total-Count"] = str(page[0].total if page else (await session.exec(count_items)).one())
    return page


@same_route_as(read_item)
async def read_item_async(
    item_id: ItemId, session: AsyncSessionDep, response: Response, if_none_match: IfNoneMatch = None
) -> Item | Response:
    item = found(await session.get(Item, item_id))
    if not_modified(if_none_match, item.version):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag(item.version)})
    return with_etag(item, response)


@same_route_as(replace_item)
async def replace_item_async(
    item_id: ItemId, item_in: ItemBase, session: AsyncSessionDep, response: Response, if_match: IfMatch = None
) -> Item:
    item = current(await session.get(Item, item_id, **LOCKED), if_match)
    if apply_changes(item, item_in.model_dump()):
        with unique_title():
            await session.commit()
    return with_etag(item, response)


@same_route_as(update_item)
async def update_item_async(
    item_id: ItemId, changes: ItemUpdate, session: AsyncSessionDep, response: Response, if_match: IfMatch = None
) -> Item:
    item = current(await session.get(Item, item_id, **LOCKED), if_match)
    if apply_changes(item, changes.model_dump(exclude_unset=True)):
        with unique_title():
            await session.commit()
    return with_etag(item, response)


@same_route_as(delete_item)
async def delete_item_async(item_id: ItemId, session: AsyncSessionDep, if_match: IfMatch = None) -> None:
    await session.delete(current(await session.get(Item, item_id, **LOCKED), if_match))
    await session.commit()
