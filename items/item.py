"""The items feature: its models, its statements and its routes, in sync and async mode.

Items use tags (items -> tags): an item's tags are rows of tags.Tag, linked through tags.ItemTag.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import AfterValidator
from pydantic import Field as Rules
from sqlalchemy import BigInteger, Integer, Row, Table, UniqueConstraint, bindparam, cast, delete, insert, update
from sqlmodel import Field, Relationship, Session, SQLModel, func, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

from core.db import AsyncSessionDep, BigId, SessionDep, UTCDateTime
from core.errors import BAD_BODY, UNAVAILABLE_RESPONSE, duplicate_is_conflict, error_response
from core.etags import (
    CHANGED_SINCE,
    NOT_MODIFIED,
    IfMatch,
    IfNoneMatch,
    changed_since_read,
    etag,
    not_modified,
    require_match,
)
from core.paging import BIGINT_MAX, LIST_HEADERS, Id, PageLimit, PageSkip, one_page
from core.routing import twins
from core.rules import NO_NUL
from core.sql import aggregate_array
from tags.tag import ItemTag, Tag, TagName, TagNames, link_tags, link_tags_async, lock_tags, lock_tags_async

# The rules for each client field, declared once for the bodies of POST and PUT (ItemIn) and PATCH (ItemUpdate).
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
    "tags": ["home"],
    "version": 1,
    "created_at": "2026-11-25T09:30:00Z",
    "updated_at": "2026-11-25T09:30:00Z",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class ItemBase(SQLModel):
    """The item's own fields, set by the client: shared by the request bodies, the table and the response."""

    title: Title
    description: Description = None


class ItemIn(ItemBase):
    """The body of POST and PUT: the fields and the tags (a PUT without tags clears them, as it clears a
    missing description)."""

    model_config = {
        "json_schema_extra": {"examples": [{"title": "Buy milk", "description": "Two litres", "tags": ["home"]}]}
    }  # type: ignore[assignment]

    tags: TagNames = []


class ItemUpdate(SQLModel):
    """The body of PATCH: every field optional, and only the fields sent are changed."""

    model_config = {"json_schema_extra": {"examples": [{"description": None}]}}  # type: ignore[assignment]

    # The type stays `str`, so `"title": null` is a 422; leaving title out keeps the current one.
    title: Title = None  # type: ignore[assignment]
    description: Description = None
    tags: TagNames = Rules(default=None, description="Replaces the item's tags when sent.")  # type: ignore[assignment]


class Item(ItemBase, table=True):
    """An item as stored."""

    # A named constraint, so a violation can be told apart from any other; and on SQLite, AUTOINCREMENT
    # so the id of a deleted item is never given to a new one (PostgreSQL's sequences never reuse ids).
    __table_args__ = (UniqueConstraint("title", name="uq_item_title"), {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId, description="Assigned by the server.")
    # A required column added to a table with rows needs a server default: the database fills the old rows.
    version: int = Field(
        default=1, sa_column_kwargs={"server_default": "1"}, description="1 when created, one more with every change."
    )
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, description="UTC, set by the server.")
    updated_at: datetime = Field(
        default_factory=utc_now, sa_type=UTCDateTime, description="UTC, changes on every update."
    )
    # lazy="raise": reading item.tags without loading them in the same query is an error, never a hidden
    # query per item (sync mode) or a MissingGreenlet (async mode). The database deletes the links.
    tags: list[Tag] = Relationship(
        link_model=ItemTag, sa_relationship_kwargs={"lazy": "raise", "passive_deletes": True}
    )


class ItemCount(SQLModel, table=True):
    """How many items there are, kept exact by triggers in the database (migration 0004), so a list reads its
    total instead of counting the table: the sum of a few slots (16 on PostgreSQL, so concurrent writers do not
    queue on one row; 1 on SQLite)."""

    __tablename__ = "item_count"

    slot: int = Field(primary_key=True)
    items: int = Field(sa_type=BigInteger)


class ItemOut(ItemBase):
    """An item as returned to the client."""

    # Every field appears in every response, so the response schema marks them all as required.
    model_config = {  # type: ignore[assignment]
        "json_schema_serialization_defaults_required": True,
        "json_schema_extra": {"examples": [ITEM_EXAMPLE]},
    }

    id: int
    tags: Annotated[list[str], AfterValidator(sorted)] = Rules(description="Tag names, sorted.")
    version: int
    created_at: datetime
    updated_at: datetime


# --- What both modes share: statements, checks and the mapping of errors to status codes ---

item_table: Table = Item.__table__  # type: ignore[attr-defined]

NOT_FOUND = "Item not found"
TITLE_TAKEN = "An item with this title already exists"


def tag_names(item_id: Any) -> Any:
    """Each item's tag names in a column of its own: a page of any size is one statement, never one per item."""
    names = select(aggregate_array(Tag.name)).select_from(ItemTag).join(Tag).where(ItemTag.item_id == item_id)
    return names.scalar_subquery().label("tags")


# The read statements are built once, at import, and run with the request's values bound to their parameters:
# SQLAlchemy caches the SQL it compiles, but building the statement objects again costs more than running them.
TAG = bindparam("tag")
COUNT_ALL = select(cast(func.sum(ItemCount.items), BigInteger))
COUNT_TAGGED = select(func.count()).select_from(ItemTag).join(Tag).where(Tag.name == TAG)
HAS_TAG = Item.id.in_(select(ItemTag.item_id).join(Tag).where(Tag.name == TAG))  # type: ignore[union-attr]
ONE_ITEM = select(item_table, tag_names(Item.id)).where(Item.id == bindparam("item_id"))


def count_items(by_tag: bool) -> Select[Any]:
    """The total for X-Total-Count: a few counter rows read, whatever the table's size; by tag (bind `tag`), its
    links counted (an index range, as long as the tag's list)."""
    return COUNT_TAGGED if by_tag else COUNT_ALL


@cache
def page_statement(by_tag: bool, by_cursor: bool) -> Select[Any]:
    page = select(item_table)
    if by_tag:
        page = page.where(HAS_TAG)
    if by_cursor:
        page = page.where(Item.id > bindparam("after"))  # type: ignore[operator]
    skip, limit = bindparam("skip", type_=BigInteger), bindparam("limit", type_=Integer)
    rows = page.order_by(Item.id).offset(skip).limit(limit).subquery()
    # Tags and total for the page's rows only: in the same SELECT as the offset, they would be computed for
    # every row skipped too.
    total = count_items(by_tag).scalar_subquery().label("total")
    return select(rows, tag_names(rows.c.id), total).order_by(rows.c.id)


def page_of_items(skip: int, limit: int, tag: str | None, after: int | None) -> tuple[Select[Any], dict[str, Any]]:
    """A page of items in id order, from the cursor `after` (an index range) or the offset `skip`, and the
    values to run it with; every row also carries the total (one query, one snapshot), and the page asks for
    one row more than it shows, to know whether a next page exists.

    The rows are plain columns, not ORM objects: a page that is only read needs no identity map or change
    tracking, and building those was most of a list's cost. The response model makes each row an ItemOut.
    """
    values = {"skip": skip, "limit": limit + 1, "tag": tag, "after": after}
    return page_statement(tag is not None, after is not None), values


# A write reads the row with a lock, with its tags: on PostgreSQL, FOR UPDATE makes two writers take turns,
# each applying its change whole to what the other left (last writer wins); in one process on SQLite, only one
# session at a time writes.
ITEM_TO_WRITE = ONE_ITEM.with_for_update(of=item_table)
# Writes are statements too, each returning the row as stored; the fields an UPDATE sets come with its values
# (update_of), so one statement serves PUT and PATCH.
THIS_ITEM = item_table.c.id == bindparam("item_id")
INSERT_ITEM = insert(item_table).returning(*item_table.c)
UPDATE_ITEM = update(item_table).where(THIS_ITEM).values(version=item_table.c.version + 1).returning(*item_table.c)
DELETE_ITEM = delete(item_table).where(THIS_ITEM).returning(item_table.c.id)
# With If-Match, the write also names the version read in its WHERE: a row that moved on since (another process
# wrote it, where no lock kept it out) is left alone, no row comes back, and the answer is 412.
AT_THE_VERSION_READ = item_table.c.version == bindparam("read_version")
UPDATE_ITEM_IF_MATCH = UPDATE_ITEM.where(AT_THE_VERSION_READ)
DELETE_ITEM_IF_MATCH = DELETE_ITEM.where(AT_THE_VERSION_READ)


def found(item: Any) -> Any:
    if item is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=NOT_FOUND)
    return item


def current(item: Row[Any] | None, if_match: str | None) -> Row[Any]:
    """The item to change, if it exists (else 404) and is in the state the client saw (else 412)."""
    require_match(if_match, found(item).version)
    return item  # type: ignore[return-value]


def written(row: Row[Any] | None) -> Row[Any]:
    """The row a write changed; none when the write named the version read and the row had moved on: nothing
    was changed, a 412."""
    if row is None:
        raise changed_since_read()
    return row


def the_row(item: Row[Any], if_match: str | None) -> dict[str, Any]:
    """The values that pick the row to write: its id, and with If-Match the version read."""
    return {"item_id": item.id} if if_match is None else {"item_id": item.id, "read_version": item.version}


def update_of(item: Row[Any], changes: dict[str, Any], if_match: str | None) -> tuple[Any, dict[str, Any]]:
    """The UPDATE for these changes and its values: the changed fields, a new updated_at, the row to write."""
    fields = {name: value for name, value in changes.items() if name != "tags"}
    values = fields | {"updated_at": utc_now()} | the_row(item, if_match)
    return (UPDATE_ITEM if if_match is None else UPDATE_ITEM_IF_MATCH), values


def delete_of(item: Row[Any], if_match: str | None) -> tuple[Any, dict[str, Any]]:
    return (DELETE_ITEM if if_match is None else DELETE_ITEM_IF_MATCH), the_row(item, if_match)


def new_item(item_in: ItemIn) -> dict[str, Any]:
    """The row to insert: the client's fields, version 1, and one moment for both timestamps (a new item
    was last updated when it was created)."""
    now = utc_now()
    return item_in.model_dump(exclude={"tags"}) | {"version": 1, "created_at": now, "updated_at": now}


def changes_to(item: Row[Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The fields (and tags) sent whose value differs from the item's: a write that changes nothing writes
    nothing, and its version, updated_at and ETag stay."""
    as_is = item._asdict() | {"tags": sorted(item.tags)}
    return {name: value for name, value in fields.items() if value != as_is[name]}


def with_tags(row: Row[Any], tags: list[str]) -> dict[str, Any]:
    return row._asdict() | {"tags": tags}


def out(item: dict[str, Any], response: Response) -> ItemOut:
    """The item as the client sees it, with its ETag."""
    response.headers["ETag"] = etag(item["version"])
    return ItemOut(**item)


def row_out(row: Row[Any], response: Response) -> Row[Any]:
    response.headers["ETag"] = etag(row.version)
    return row


def unique_title() -> AbstractContextManager[None]:
    """Around a write: a title another item already has is a 409 (the database's constraint decides)."""
    return duplicate_is_conflict(TITLE_TAKEN, "uq_item_title", "item.title")


ITEM_NOT_FOUND = {404: error_response("No item has this id.", NOT_FOUND)}
TITLE_CONFLICT = {409: error_response("Another item already has this title.", TITLE_TAKEN)}
WRITE_ERRORS = BAD_BODY | ITEM_NOT_FOUND | TITLE_CONFLICT | CHANGED_SINCE
ItemId = Annotated[Id, Rules(description="The item's id.")]
TagFilter = Annotated[TagName | None, Query(description="Only the items that have this tag.")]
After = Annotated[
    int | None,
    Query(
        ge=-BIGINT_MAX - 1,
        le=BIGINT_MAX,
        description="Continue after the item with this id: the cursor in the Link header's next URL. "
        "Costs the same at any depth, where skip costs its offset.",
    ),
]

# --- Sync mode (the default): `def` routes run in a worker thread with a `Session` ---

router = APIRouter(prefix="/items", tags=["items"], responses=UNAVAILABLE_RESPONSE)


def write_changes(session: Session, item_id: int, fields: dict[str, Any], if_match: str | None) -> dict[str, Any]:
    """Set these fields (and tags, if sent) on the item, read under its lock; the item as it now is. The
    route commits."""
    tag_ids = lock_tags(session, fields["tags"]) if "tags" in fields else []  # the tags before the item
    item = current(session.exec(ITEM_TO_WRITE, params={"item_id": item_id}).first(), if_match)
    changes = changes_to(item, fields)
    if not changes:
        return item._asdict()
    if "tags" in changes:
        link_tags(session, item_id, tag_ids, replace=True)
    statement, values = update_of(item, changes, if_match)
    with unique_title():
        row = written(session.exec(statement, params=values).first())
    return with_tags(row, changes.get("tags", item.tags))


@router.post("/", status_code=status.HTTP_201_CREATED, summary="Create an item", responses=BAD_BODY | TITLE_CONFLICT)
def create_item(item_in: ItemIn, session: SessionDep, response: Response) -> ItemOut:
    """Create an item with its tags (new tag names become tags); answers with its Location and ETag."""
    # One transaction: if the title is taken, the tags made for this item are rolled back with it.
    tag_ids = lock_tags(session, item_in.tags)
    with unique_title():
        item = session.exec(INSERT_ITEM, params=new_item(item_in)).one()
    link_tags(session, item.id, tag_ids)
    session.commit()
    response.headers["Location"] = f"/items/{item.id}"
    return out(with_tags(item, item_in.tags), response)


# The route returns rows, so the response model is declared here rather than by the return type.
@router.get("/", summary="List items", response_model=list[ItemOut], responses=LIST_HEADERS)
def list_items(
    session: SessionDep,
    request: Request,
    response: Response,
    after: After = None,
    skip: PageSkip = 0,
    limit: PageLimit = 100,
    tag: TagFilter = None,
) -> Sequence[Row[Any]]:
    """List items ordered by id, a page at a time: follow the Link header's next URL to page through any number
    of items; X-Total-Count gives how many there are."""
    statement, values = page_of_items(skip, limit, tag, after)
    rows = session.exec(statement, params=values).all()
    # A page past the end has no row to carry the count: only then is it a query of its own.
    total = rows[0].total if rows else session.exec(count_items(tag is not None), params=values).one()
    return one_page(rows, limit, "id", total, request, response)


# Returning a Response (the 304) bypasses the response model, so it is declared here.
@router.get("/{item_id}", summary="Read an item", response_model=ItemOut, responses=ITEM_NOT_FOUND | NOT_MODIFIED)
def read_item(
    item_id: ItemId, session: SessionDep, response: Response, if_none_match: IfNoneMatch = None
) -> Row[Any] | Response:
    """Return the item with this id and its ETag; 304 with no body if If-None-Match names that ETag."""
    item = found(session.exec(ONE_ITEM, params={"item_id": item_id}).first())
    if not_modified(if_none_match, item.version):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag(item.version)})
    return row_out(item, response)


@router.put("/{item_id}", summary="Replace an item", responses=WRITE_ERRORS)
def replace_item(
    item_id: ItemId, item_in: ItemIn, session: SessionDep, response: Response, if_match: IfMatch = None
) -> ItemOut:
    """Replace the item's fields and tags (those left out become null and none); If-Match makes it conditional."""
    item = write_changes(session, item_id, item_in.model_dump(), if_match)
    session.commit()
    return out(item, response)


@router.patch("/{item_id}", summary="Update an item", responses=WRITE_ERRORS)
def update_item(
    item_id: ItemId, changes: ItemUpdate, session: SessionDep, response: Response, if_match: IfMatch = None
) -> ItemOut:
    """Change only the fields sent (`"description": null` clears it; `tags` replaces them); If-Match makes it
    conditional."""
    item = write_changes(session, item_id, changes.model_dump(exclude_unset=True), if_match)
    session.commit()
    return out(item, response)


@router.delete(
    "/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an item",
    responses=ITEM_NOT_FOUND | CHANGED_SINCE,
)
def delete_item(item_id: ItemId, session: SessionDep, if_match: IfMatch = None) -> None:
    """Delete the item with this id (its tags stay); If-Match makes it conditional."""
    item = current(session.exec(ITEM_TO_WRITE, params={"item_id": item_id}).first(), if_match)
    statement, values = delete_of(item, if_match)
    written(session.exec(statement, params=values).first())
    session.commit()


# --- Async mode: the same routes as `async def` with an `AsyncSession`; only the I/O differs ---

async_router = APIRouter()
same_route_as = twins(router, async_router)


async def write_changes_async(
    session: AsyncSession, item_id: int, fields: dict[str, Any], if_match: str | None
) -> dict[str, Any]:
    tag_ids = await lock_tags_async(session, fields["tags"]) if "tags" in fields else []
    item = current((await session.exec(ITEM_TO_WRITE, params={"item_id": item_id})).first(), if_match)
    changes = changes_to(item, fields)
    if not changes:
        return item._asdict()
    if "tags" in changes:
        await link_tags_async(session, item_id, tag_ids, replace=True)
    statement, values = update_of(item, changes, if_match)
    with unique_title():
        row = written((await session.exec(statement, params=values)).first())
    return with_tags(row, changes.get("tags", item.tags))


@same_route_as(create_item)
async def create_item_async(item_in: ItemIn, session: AsyncSessionDep, response: Response) -> ItemOut:
    tag_ids = await lock_tags_async(session, item_in.tags)
    with unique_title():
        item = (await session.exec(INSERT_ITEM, params=new_item(item_in))).one()
    await link_tags_async(session, item.id, tag_ids)
    await session.commit()
    response.headers["Location"] = f"/items/{item.id}"
    return out(with_tags(item, item_in.tags), response)


@same_route_as(list_items)
async def list_items_async(
    session: AsyncSessionDep,
    request: Request,
    response: Response,
    after: After = None,
    skip: PageSkip = 0,
    limit: PageLimit = 100,
    tag: TagFilter = None,
) -> Sequence[Row[Any]]:
    statement, values = page_of_items(skip, limit, tag, after)
    rows = (await session.exec(statement, params=values)).all()
    total = rows[0].total if rows else (await session.exec(count_items(tag is not None), params=values)).one()
    return one_page(rows, limit, "id", total, request, response)


@same_route_as(read_item)
async def read_item_async(
    item_id: ItemId, session: AsyncSessionDep, response: Response, if_none_match: IfNoneMatch = None
) -> Row[Any] | Response:
    item = found((await session.exec(ONE_ITEM, params={"item_id": item_id})).first())
    if not_modified(if_none_match, item.version):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag(item.version)})
    return row_out(item, response)


@same_route_as(replace_item)
async def replace_item_async(
    item_id: ItemId, item_in: ItemIn, session: AsyncSessionDep, response: Response, if_match: IfMatch = None
) -> ItemOut:
    item = await write_changes_async(session, item_id, item_in.model_dump(), if_match)
    await session.commit()
    return out(item, response)


@same_route_as(update_item)
async def update_item_async(
    item_id: ItemId, changes: ItemUpdate, session: AsyncSessionDep, response: Response, if_match: IfMatch = None
) -> ItemOut:
    item = await write_changes_async(session, item_id, changes.model_dump(exclude_unset=True), if_match)
    await session.commit()
    return out(item, response)


@same_route_as(delete_item)
async def delete_item_async(item_id: ItemId, session: AsyncSessionDep, if_match: IfMatch = None) -> None:
    item = current((await session.exec(ITEM_TO_WRITE, params={"item_id": item_id})).first(), if_match)
    statement, values = delete_of(item, if_match)
    written((await session.exec(statement, params=values)).first())
    await session.commit()
