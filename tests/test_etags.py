"""core/etags.py: how If-Match and If-None-Match are read (RFC 9110: strong and weak comparison, lists, *)."""

import pytest
from fastapi import HTTPException

from core.etags import etag, not_modified, require_match


def test_an_etag_is_the_version_quoted() -> None:
    assert etag(3) == '"3"'


@pytest.mark.parametrize("header", [None, '"3"', "*", '"1", "3"', '"1","3"', ' "3" '])
def test_if_match_lets_a_write_through_when_it_names_the_version(header: str | None) -> None:
    require_match(header, 3)


@pytest.mark.parametrize("header", ['"2"', 'W/"3"', '"1", "2"', "3", '""'])
def test_if_match_stops_a_write_with_412_otherwise(header: str) -> None:
    with pytest.raises(HTTPException) as stopped:
        require_match(header, 3)
    assert stopped.value.status_code == 412


@pytest.mark.parametrize(
    "header, unchanged",
    [(None, False), ('"3"', True), ('W/"3"', True), ("*", True), ('"1", W/"3"', True), ('"2"', False), ("3", False)],
)
def test_if_none_match_compares_weakly(header: str | None, unchanged: bool) -> None:
    assert not_modified(header, 3) is unchanged
