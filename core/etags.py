"""ETags and conditional requests (RFC 9110) for any feature whose rows carry a version.

A row's ETag is its version, quoted: `"3"`. A client sends it back to say which state it saw:
`If-Match` on a write (412 if the row has changed since), `If-None-Match` on a read (304 if it has not).
"""

from typing import Annotated, Any

from fastapi import Header, HTTPException, status

from core.errors import PRECONDITION_FAILED, error_response

IfMatch = Annotated[
    str | None,
    Header(
        description='Change only if the current ETag is one of these, or "*" for any: else 412, nothing changed.',
        examples=['"1"'],
    ),
]
IfNoneMatch = Annotated[
    str | None,
    Header(description="Answer 304 Not Modified, with no body, if the current ETag is one of these.", examples=['"1"']),
]

NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the ETag you sent is still current (no body)."}
}
CHANGED_SINCE = {
    412: error_response("The ETag in If-Match is no longer current: nothing was changed.", PRECONDITION_FAILED)
}


def etag(version: int) -> str:
    return f'"{version}"'


def listed(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",")]


def changed_since_read() -> HTTPException:
    return HTTPException(status_code=status.HTTP_412_PRECONDITION_FAILED, detail=PRECONDITION_FAILED)


def require_match(if_match: str | None, version: int) -> None:
    """If-Match: proceed only if the version is one of those listed (a strong comparison: W/ tags never match)."""
    if if_match is None:
        return
    tags = listed(if_match)
    if "*" not in tags and etag(version) not in tags:
        raise changed_since_read()


def not_modified(if_none_match: str | None, version: int) -> bool:
    """If-None-Match on a read: True when the client's copy is current (a weak comparison, as for GET)."""
    if if_none_match is None:
        return False
    tags = [tag.removeprefix("W/") for tag in listed(if_none_match)]
    return "*" in tags or etag(version) in tags
