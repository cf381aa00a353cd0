"""Paging, the same for every list: `skip` and `limit` query parameters, and X-Total-Count."""

from typing import Annotated

from fastapi import Path, Query

# Ids and offsets are 64-bit in the database; a larger number is a 422, not a database error.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, Path(ge=-BIGINT_MAX - 1, le=BIGINT_MAX)]
PageSkip = Annotated[int, Query(ge=0, le=BIGINT_MAX, description="How many rows to skip.")]
PageLimit = Annotated[int, Query(ge=1, le=100, description="How many rows to return, at most 100.")]
