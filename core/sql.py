"""SQL that reads the same in every feature but is spelled differently by each database."""

from typing import Any

from sqlalchemy import JSON
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import GenericFunction


class aggregate_array(GenericFunction[Any]):
    """The values of a column over a group of rows, as one list: `[]` when there are none.

    With it, a list query returns each row's related names in a column of its own: one statement for a
    page of any size, where loading them row by row would be one more query per row (N+1). PostgreSQL
    returns an array, which its drivers read as a list; SQLite, which has no arrays, a JSON array that the
    JSON type reads as a list.
    """

    type = JSON()
    inherit_cache = True


@compiles(aggregate_array, "postgresql")
def aggregate_array_postgresql(element: aggregate_array, compiler: Any, **kw: Any) -> str:
    return f"coalesce(array_agg({compiler.process(element.clauses, **kw)}), '{{}}')"


@compiles(aggregate_array, "sqlite")
def aggregate_array_sqlite(element: aggregate_array, compiler: Any, **kw: Any) -> str:
    return f"json_group_array({compiler.process(element.clauses, **kw)})"


def dialect_insert(session: Session | AsyncSession) -> Any:
    """INSERT with ON CONFLICT, which PostgreSQL and SQLite both have, each with its own construct."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
