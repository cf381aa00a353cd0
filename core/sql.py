"""SQL that reads the same in every feature but is spelled differently by each database."""

from typing import Any

from sqlalchemy import JSON
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import GenericFunction


class json_array(GenericFunction[Any]):
    """The values of a column over a group of rows, as one JSON array: `[]` when there are none.

    With it, a list query returns each row's related names in a column of its own: one statement for a
    page of any size, where loading them row by row would be one more query per row (N+1).
    """

    type = JSON()
    inherit_cache = True


@compiles(json_array, "postgresql")
def json_array_postgresql(element: json_array, compiler: Any, **kw: Any) -> str:
    return f"coalesce(json_agg({compiler.process(element.clauses, **kw)}), '[]')"


@compiles(json_array, "sqlite")
def json_array_sqlite(element: json_array, compiler: Any, **kw: Any) -> str:
    return f"json_group_array({compiler.process(element.clauses, **kw)})"
