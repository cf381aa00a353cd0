"""Paging, the same for every list: a cursor (`after`) or an offset (`skip`), `limit`, a Link to the next page.

The cursor is the sort key of the last row seen: the next page is `WHERE key > :after ORDER BY key LIMIT n`,
an index range scan that costs the same at any depth. `skip` makes the database walk past every row it
skips, so its cost grows with the offset; it stays for clients that use it.
"""

from collections.abc import Sequence
from typing import Annotated, TypeVar

from fastapi import Path, Query, Request, Response

# Ids and offsets are 64-bit in the database; a larger number is a 422, not a database error.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, Path(ge=-BIGINT_MAX - 1, le=BIGINT_MAX)]
PageSkip = Annotated[
    int, Query(ge=0, le=BIGINT_MAX, description="How many rows to skip; costs the database that many rows.")
]
PageLimit = Annotated[int, Query(ge=1, le=100, description="How many rows to return, at most 100.")]
Row = TypeVar("Row")


def one_page(
    rows: Sequence[Row], limit: int, key: str, total: int, request: Request, response: Response
) -> Sequence[Row]:
    """The page, and the headers every list answers with: X-Total-Count, and, when a next page exists,
    `Link: <...after=KEY...>; rel="next"` (RFC 8288) with the request's other parameters. `rows` holds one row
    more than `limit` when there is a next page (so no extra query asks)."""
    response.headers["X-Total-Count"] = str(total)
    if len(rows) <= limit:
        return rows
    page = rows[:limit]
    url = request.url.remove_query_params("skip").include_query_params(after=getattr(page[-1], key), limit=limit)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return page


# For the OpenAPI schema: the headers every list answers with.
LIST_HEADERS = {
    200: {
        "headers": {
            "X-Total-Count": {"description": "How many rows the whole list has.", "schema": {"type": "integer"}},
            "Link": {
                "description": 'The next page, if there is one: `<URL>; rel="next"`.',
                "schema": {"type": "string"},
            },
        }
    }
}
