"""The tags feature: names shared by items, the links between tags and items, and the /tags routes.

Tags import no other feature; items use tags (items -> tags). The links point at the item table by name only
(a foreign key to item.id, and `item_table` below), so this module never imports the items feature.
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from pydantic import AfterValidator
from pydantic import Field as Rules
from sqlalchemy import Index, Row, UniqueConstraint, bindparam, column, delete, table, update
from sqlmodel import Field, Session, SQLModel, func, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

from core.db import AsyncSessionDep, BigId, SessionDep, UTCDateTime
from core.errors import BAD_BODY, UNAVAILABLE_RESPONSE, duplicate_is_conflict, error_response
from core.paging import LIST_HEADERS, PageLimit, PageSkip, one_page
from core.routing import twins
from core.rules import NO_NUL
from core.sql import dialect_insert

MAX_TAGS = 20
TagName = Annotated[
    str,
    Rules(min_length=1, max_length=50, pattern=NO_NUL, description="1 to 50 characters, unique.", examples=["home"]),
]


def distinct(names: list[str]) -> list[str]:
    """Repeated names count once; more than MAX_TAGS different ones is a 422."""
    unique = sorted(set(names))
    if len(unique) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} different tags")
    return unique


TagNames = Annotated[
    list[TagName],
    AfterValidator(distinct),
    Rules(description=f"Tag names; repeated ones count once, at most {MAX_TAGS}.", examples=[["home", "work"]]),
]
After = Annotated[
    TagName | None, Query(description="Continue after the tag with this name (the Link header's cursor).")
]
NameInPath = Annotated[str, Path(min_length=1, max_length=50, pattern=NO_NUL, description="The tag's name.")]


class TagBase(SQLModel):
    """The fields a client sends: the body of PATCH /tags/{name}, which renames the tag."""

    name: TagName


class Tag(TagBase, table=True):
    """A tag as stored; created on first use by an item, shared by every item that has it."""

    __table_args__ = (UniqueConstraint("name", name="uq_tag_name"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)


class ItemTag(SQLModel, table=True):
    """Which item has which tag. Deleting an item or a tag deletes its links, in the schema (ON DELETE CASCADE)."""

    __tablename__ = "item_tag"
    # The primary key (item_id, tag_id) finds an item's tags; this index finds a tag's items.
    __table_args__ = (Index("ix_item_tag_tag_id_item_id", "tag_id", "item_id"),)

    item_id: int = Field(foreign_key="item.id", ondelete="CASCADE", primary_key=True, sa_type=BigId)
    tag_id: int = Field(foreign_key="tag.id", ondelete="CASCADE", primary_key=True, sa_type=BigId)


class TagOut(TagBase):
    """A tag as returned: its name and how many items have it."""

    item_count: int = Field(description="How many items have this tag.")


# --- What both modes share ---

NOT_FOUND = "Tag not found"
NAME_TAKEN = "A tag with this name already exists"
TAG_NOT_FOUND = {404: error_response("No tag has this name.", NOT_FOUND)}
NAME_CONFLICT = {409: error_response("Another tag already has this name.", NAME_TAKEN)}

items_with_the_tag = select(func.count()).where(ItemTag.tag_id == Tag.id).scalar_subquery()
count_tags = select(func.count()).select_from(Tag)
# The items a tag is on, known by table name only: a rename or a delete changes how they read, so their
# versions (and ETags) and updated_at move too.
item_table = table("item", column("id"), column("version"), column("updated_at", UTCDateTime))


def page_of_tags(skip: int, limit: int, after: str | None) -> Select[Any]:
    """A page of tags by name (one row more, to know whether a next page exists), each with its item count and
    the count of all tags (one query)."""
    columns = [Tag.name, items_with_the_tag.label("item_count"), count_tags.scalar_subquery().label("total")]
    page = select(*columns)
    if after is not None:
        page = page.where(Tag.name > after)
    return page.order_by(Tag.name).offset(skip).limit(limit + 1)


def tag_named(name: str) -> Select[Any]:
    return select(Tag.name, items_with_the_tag.label("item_count")).where(Tag.name == name)


def found(row: Any) -> Any:
    if row is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=NOT_FOUND)
    return row


def new_versions_for_items_tagged(tag_id: int) -> Any:
    tagged = select(ItemTag.item_id).where(ItemTag.tag_id == tag_id)
    changed = {"version": item_table.c.version + 1, "updated_at": datetime.now(UTC)}
    return update(item_table).where(item_table.c.id.in_(tagged)).values(changed)


def unique_name() -> Any:
    return duplicate_is_conflict(NAME_TAKEN, "uq_tag_name", "tag.name")


# --- What items use: tags by name, created on first use, locked until the item's write commits ---

NAMES, TAG_IDS = bindparam("names", expanding=True), bindparam("tag_ids", expanding=True)
# FOR KEY SHARE: a rename or a delete of these tags waits until the item's write commits, so a write never
# links a tag that is gone. Writers that share a tag do not wait for each other.
LOCKED_TAG_IDS = select(Tag.id).where(Tag.name.in_(NAMES)).with_for_update(key_share=True)  # type: ignore[attr-defined]
# The item's links to its other tags: a PUT or PATCH that replaces the tags deletes them.
UNLINK_OTHERS = delete(ItemTag).where(
    ItemTag.item_id == bindparam("item_id"),  # type: ignore[arg-type]
    ItemTag.tag_id.not_in(TAG_IDS),  # type: ignore[attr-defined]
)


def insert_missing(session: Session | AsyncSession, names: list[str]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: twenty requests that bring the same new name at once all succeed,
    and the database keeps one row (the others wait for the first one's commit, then skip it)."""
    # In name order, so two requests bringing the same names lock them in the same order (no deadlock).
    return dialect_insert(session)(Tag).values([{"name": name} for name in sorted(names)]).on_conflict_do_nothing()


@cache
def link(insert: Any) -> Any:
    """INSERT ... SELECT: the item's links to these tags, skipping those it has, in one statement for any
    number of tags (built once per database)."""
    tags = select(bindparam("item_id", type_=BigId), Tag.id).where(Tag.id.in_(TAG_IDS))  # type: ignore[union-attr]
    return insert(ItemTag.__table__).from_select(["item_id", "tag_id"], tags).on_conflict_do_nothing()


# An item's write locks its tags before its own row, and a rename or delete of a tag locks the tag before
# its items: one order for everyone, so two such writes never wait for each other in a circle (a deadlock).
def lock_tags(session: Session, names: list[str]) -> Sequence[int]:
    """The ids of the tags with these names, inserting the new ones; locked until the commit."""
    ids: Sequence[int] = []
    # A tag deleted between the insert and the select is missing from it: the next round inserts it again.
    while len(ids) < len(names):
        session.exec(insert_missing(session, names))
        ids = session.exec(LOCKED_TAG_IDS, params={"names": names}).all()
    return ids


def link_tags(session: Session, item_id: int, tag_ids: Sequence[int], replace: bool = False) -> None:
    """Link the item to these tags; `replace` unlinks its other tags."""
    values = {"item_id": item_id, "tag_ids": list(tag_ids)}
    if replace:
        session.exec(UNLINK_OTHERS, params=values)
    if tag_ids:
        session.exec(link(dialect_insert(session)), params=values)


async def lock_tags_async(session: AsyncSession, names: list[str]) -> Sequence[int]:
    ids: Sequence[int] = []
    while len(ids) < len(names):
        await session.exec(insert_missing(session, names))
        ids = (await session.exec(LOCKED_TAG_IDS, params={"names": names})).all()
    return ids


async def link_tags_async(session: AsyncSession, item_id: int, tag_ids: Sequence[int], replace: bool = False) -> None:
    values = {"item_id": item_id, "tag_ids": list(tag_ids)}
    if replace:
        await session.exec(UNLINK_OTHERS, params=values)
    if tag_ids:
        await session.exec(link(dialect_insert(session)), params=values)


# --- Sync mode: `def` routes run in a worker thread with a `Session` ---

router = APIRouter(prefix="/tags", tags=["tags"], responses=UNAVAILABLE_RESPONSE)


# The route returns rows, so the response model is declared here rather than by the return type.
@router.get("/", summary="List tags", response_model=list[TagOut], responses=LIST_HEADERS)
def list_tags(
    session: SessionDep,
    request: Request,
    response: Response,
    after: After = None,
    skip: PageSkip = 0,
    limit: PageLimit = 100,
) -> Sequence[Row[Any]]:
    """List tags ordered by name, each with its item count, a page at a time (the Link header's next URL);
    X-Total-Count gives the number of all tags."""
    rows = session.exec(page_of_tags(skip, limit, after)).all()
    total = rows[0].total if rows else session.exec(count_tags).one()
    return one_page(rows, limit, "name", total, request, response)


@router.get("/{name:path}", summary="Read a tag", response_model=TagOut, responses=TAG_NOT_FOUND)
def read_tag(name: NameInPath, session: SessionDep) -> Row[Any]:
    """Return the tag with this name and how many items have it."""
    return found(session.exec(tag_named(name)).first())


@router.patch(
    "/{name:path}", summary="Rename a tag", response_model=TagOut, responses=BAD_BODY | TAG_NOT_FOUND | NAME_CONFLICT
)
def rename_tag(name: NameInPath, renamed: TagBase, session: SessionDep) -> Row[Any]:
    """Rename the tag; every item that has it shows the new name."""
    tag = found(session.exec(select(Tag).where(Tag.name == name).with_for_update()).first())
    tag.name = renamed.name
    with unique_name():
        session.exec(new_versions_for_items_tagged(tag.id))  # flushes the new name first
    # Read before the commit: after it, another rename could already have changed the name.
    answer = session.exec(tag_named(tag.name)).one()
    session.commit()
    return answer


@router.delete("/{name:path}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a tag", responses=TAG_NOT_FOUND)
def delete_tag(name: NameInPath, session: SessionDep) -> None:
    """Delete the tag: it leaves every item that had it, and the items stay."""
    tag = found(session.exec(select(Tag).where(Tag.name == name).with_for_update()).first())
    session.exec(new_versions_for_items_tagged(tag.id))
    session.delete(tag)
    session.commit()


# --- Async mode: the same routes as `async def` with an `AsyncSession`; only the I/O differs ---

async_router = APIRouter()
same_route_as = twins(router, async_router)


@same_route_as(list_tags)
async def list_tags_async(
    session: AsyncSessionDep,
    request: Request,
    response: Response,
    after: After = None,
    skip: PageSkip = 0,
    limit: PageLimit = 100,
) -> Sequence[Row[Any]]:
    rows = (await session.exec(page_of_tags(skip, limit, after))).all()
    total = rows[0].total if rows else (await session.exec(count_tags)).one()
    return one_page(rows, limit, "name", total, request, response)


@same_route_as(read_tag)
async def read_tag_async(name: NameInPath, session: AsyncSessionDep) -> Row[Any]:
    return found((await session.exec(tag_named(name))).first())


@same_route_as(rename_tag)
async def rename_tag_async(name: NameInPath, renamed: TagBase, session: AsyncSessionDep) -> Row[Any]:
    tag = found((await session.exec(select(Tag).where(Tag.name == name).with_for_update())).first())
    tag.name = renamed.name
    with unique_name():
        await session.exec(new_versions_for_items_tagged(tag.id))
    answer = (await session.exec(tag_named(tag.name))).one()
    await session.commit()
    return answer


@same_route_as(delete_tag)
async def delete_tag_async(name: NameInPath, session: AsyncSessionDep) -> None:
    tag = found((await session.exec(select(Tag).where(Tag.name == name).with_for_update())).first())
    await session.exec(new_versions_for_items_tagged(tag.id))
    await session.delete(tag)
    await session.commit()
