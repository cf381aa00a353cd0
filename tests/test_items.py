"""The items HTTP contract, in every mode (sync and async, SQLite and PostgreSQL when configured).

Races between concurrent requests run against a real server: tests/test_item_races.py and tests/test_server.py.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from httpx import URL, Response
from sqlalchemy import Engine, event
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from items.item import Item
from tests.conftest import App, create, sync_engine_of


def parse_utc(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), f"{value} is not UTC"
    return moment


# --- POST /items/ ---


def test_create_item_returns_201_with_the_item_and_its_location(client: TestClient) -> None:
    before = datetime.now(UTC)
    response = client.post("/items/", json={"title": "Buy milk", "description": "Two litres"})

    assert response.status_code == 201
    item = response.json()
    assert set(item) == {"id", "title", "description", "tags", "version", "created_at", "updated_at"}
    assert item["tags"] == []
    assert item["title"] == "Buy milk" and item["description"] == "Two litres"
    assert item["version"] == 1 and response.headers["etag"] == '"1"'
    assert isinstance(item["id"], int)
    assert response.headers["location"] == f"/items/{item['id']}"
    assert before - timedelta(seconds=5) <= parse_utc(item["created_at"]) <= datetime.now(UTC)
    # A new item was last updated at the moment it was created.
    assert item["updated_at"] == item["created_at"]


def test_create_item_without_description_stores_null(client: TestClient) -> None:
    item = create(client, "No description")
    assert item["description"] is None
    assert client.get(f"/items/{item['id']}").json()["description"] is None


def test_create_item_ignores_a_client_sent_id_and_timestamps(client: TestClient) -> None:
    body = {"title": "Mine", "id": 4242, "created_at": "2000-01-01T00:00:00Z", "updated_at": "2000-01-01T00:00:00Z"}
    response = client.post("/items/", json=body)

    assert response.status_code == 201
    item = response.json()
    assert item["id"] != 4242
    assert item["created_at"].startswith(str(datetime.now(UTC).year))
    assert client.get("/items/4242").status_code == 404


def test_create_item_with_duplicate_title_returns_409(client: TestClient) -> None:
    create(client, "Same")
    response = client.post("/items/", json={"title": "Same", "description": "again"})

    assert response.status_code == 409
    assert response.json() == {"detail": "An item with this title already exists"}
    assert client.get("/items/").headers["x-total-count"] == "1"


def test_request_after_a_409_works_normally(client: TestClient) -> None:
    create(client, "Same")
    assert client.post("/items/", json={"title": "Same"}).status_code == 409

    item = create(client, "Different")
    assert client.get(f"/items/{item['id']}").status_code == 200


@pytest.mark.parametrize("length", [1, 100])
def test_create_item_accepts_title_lengths_at_the_bounds(client: TestClient, length: int) -> None:
    assert create(client, "t" * length)["title"] == "t" * length


@pytest.mark.parametrize("length", [0, 101])
def test_create_item_rejects_title_lengths_outside_the_bounds_with_422(client: TestClient, length: int) -> None:
    response = client.post("/items/", json={"title": "t" * length})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


def test_create_item_accepts_a_1000_character_description(client: TestClient) -> None:
    assert create(client, "Long", description="d" * 1000)["description"] == "d" * 1000


def test_create_item_rejects_a_1001_character_description_with_422(client: TestClient) -> None:
    response = client.post("/items/", json={"title": "Too long", "description": "d" * 1001})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "description"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": None},
        {"title": 123},
        {"title": ["a"]},
        {"title": "ok", "description": 5},
        {"title": "ok", "description": {"a": 1}},
        {"title": "nul\u0000inside"},
        [],
        "just a string",
    ],
    ids=[
        "missing-title",
        "null-title",
        "int-title",
        "list-title",
        "int-description",
        "object-description",
        "nul-character",
        "list-body",
        "string-body",
    ],
)
def test_create_item_with_invalid_body_returns_422(client: TestClient, body: object) -> None:
    response = client.post("/items/", json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)
    assert client.get("/items/").headers["x-total-count"] == "0"


def test_create_item_with_malformed_json_returns_422(client: TestClient) -> None:
    response = client.post("/items/", content=b'{"title": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "detail" in response.json()


# --- GET /items/ ---


def test_list_items_returns_items_ordered_by_id_with_total_count(client: TestClient) -> None:
    ids = [create(client, f"item {n}")["id"] for n in (3, 1, 2)]

    response = client.get("/items/")

    assert response.status_code == 200
    assert [item["id"] for item in response.json()] == sorted(ids)
    assert response.headers["x-total-count"] == "3"


def test_list_items_shows_each_item_exactly_as_read_item_does(client: TestClient) -> None:
    created = [create(client, "Plain"), create(client, "Described", description="Two litres")]
    client.patch(f"/items/{created[0]['id']}", json={"description": "changed"})

    listed = client.get("/items/").json()

    assert listed == [client.get(f"/items/{item['id']}").json() for item in created]


def test_list_items_pages_with_skip_and_limit_and_counts_all_rows(client: TestClient) -> None:
    ids = [create(client, f"item {n}")["id"] for n in range(5)]

    response = client.get("/items/", params={"skip": 1, "limit": 2})

    assert [item["id"] for item in response.json()] == ids[1:3]
    assert response.headers["x-total-count"] == "5"


def test_list_items_beyond_the_last_page_is_empty_with_total_count(client: TestClient) -> None:
    create(client)
    response = client.get("/items/", params={"skip": 10})
    assert response.json() == [] and response.headers["x-total-count"] == "1"


def test_list_items_on_an_empty_database_is_empty(client: TestClient) -> None:
    response = client.get("/items/")
    assert response.status_code == 200
    assert response.json() == [] and response.headers["x-total-count"] == "0"


def test_list_items_returns_at_most_100_by_default(client: TestClient) -> None:
    for n in range(101):
        create(client, f"item {n}")
    response = client.get("/items/")
    assert len(response.json()) == 100 and response.headers["x-total-count"] == "101"


@pytest.mark.parametrize("params", [{"skip": -1}, {"limit": 0}, {"limit": 101}, {"skip": "a"}, {"limit": "1.5"}])
def test_list_items_with_bad_paging_returns_422(client: TestClient, params: dict) -> None:
    response = client.get("/items/", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


@pytest.mark.parametrize("params", [{"skip": 0, "limit": 1}, {"limit": 100}])
def test_list_items_accepts_paging_at_the_bounds(client: TestClient, params: dict) -> None:
    create(client)
    assert client.get("/items/", params=params).status_code == 200


# --- Paging through a long list: the Link header's cursor ---


def next_url(response: Response) -> str | None:
    """The URL of the Link header's rel="next", if any."""
    link = response.headers.get("link")
    if link is None:
        return None
    url, rel = link.split(";", 1)
    assert rel.strip() == 'rel="next"', link
    return url.strip().removeprefix("<").removesuffix(">")


def link_target(response: Response) -> tuple[str, dict[str, str]]:
    url = URL(str(next_url(response)))
    return url.path, dict(url.params)


def test_a_full_page_links_to_the_next_one_by_the_last_id_and_the_last_page_links_nowhere(
    client: TestClient,
) -> None:
    ids = [create(client, f"item {n}")["id"] for n in range(5)]

    first = client.get("/items/", params={"limit": 2})
    second = client.get(next_url(first))
    third = client.get(next_url(second))

    assert link_target(first) == ("/items/", {"limit": "2", "after": str(ids[1])})
    assert [[item["id"] for item in page.json()] for page in (first, second, third)] == [ids[:2], ids[2:4], ids[4:]]
    assert next_url(third) is None
    assert {page.headers["x-total-count"] for page in (first, second, third)} == {"5"}


def test_a_page_that_ends_exactly_at_the_last_item_links_nowhere(client: TestClient) -> None:
    for n in range(4):
        create(client, f"item {n}")

    response = client.get("/items/", params={"limit": 4})

    assert len(response.json()) == 4 and next_url(response) is None


def test_the_next_link_keeps_the_tag_filter_and_the_limit_and_drops_skip(client: TestClient) -> None:
    tagged = [create(client, f"home {n}", tags=["home"])["id"] for n in range(3)]
    create(client, "work", tags=["work"])

    first = client.get("/items/", params={"tag": "home", "limit": 1, "skip": 1})
    rest = client.get(next_url(first))

    assert link_target(first) == ("/items/", {"tag": "home", "limit": "1", "after": str(tagged[1])})
    assert [item["id"] for item in rest.json()] == [tagged[2]]
    assert rest.headers["x-total-count"] == "3"


def test_following_the_links_visits_every_item_once_in_id_order_while_items_come_and_go(client: TestClient) -> None:
    ids = [create(client, f"item {n}")["id"] for n in range(10)]
    seen: list[int] = []
    url: str | None = "/items/?limit=3"
    changes = iter(
        [
            lambda: (
                client.delete(f"/items/{ids[1]}"),  # already seen: changes nothing ahead
                client.delete(f"/items/{ids[7]}"),  # not seen yet: never shown
            ),
            lambda: create(client, "added while paging"),  # a new, higher id: shown at the end
        ]
    )
    while url:
        response = client.get(url)
        seen += [item["id"] for item in response.json()]
        next(changes, lambda: None)()
        url = next_url(response)

    added = client.get("/items/", params={"after": ids[-1]}).json()[0]["id"]
    assert seen == [*ids[:7], *ids[8:], added]


@pytest.mark.parametrize("params", [{"after": "x"}, {"after": 2**63}])
def test_a_cursor_that_is_not_a_64_bit_id_is_422(client: TestClient, params: dict) -> None:
    response = client.get("/items/", params=params)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "after"]


def test_the_total_counts_every_insert_and_delete_whoever_makes_them(api: App) -> None:
    for n in range(3):
        create(api.client, f"item {n}")
    api.execute("INSERT INTO item (title, created_at, updated_at) VALUES ('by sql', '2026-01-01', '2026-01-01')")
    api.execute("DELETE FROM item WHERE title IN ('item 0', 'item 1')")

    assert api.client.get("/items/").headers["x-total-count"] == "2"
    assert api.count_rows() == 2


# --- GET /items/{item_id} ---


def test_read_item_returns_the_item(client: TestClient) -> None:
    item = create(client, "Read me", description="please")
    response = client.get(f"/items/{item['id']}")
    assert response.status_code == 200
    assert response.json() == item


def test_read_missing_item_returns_404(client: TestClient) -> None:
    response = client.get("/items/999999")
    assert response.status_code == 404
    assert response.json() == {"detail": "Item not found"}


@pytest.mark.parametrize("item_id", ["abc", "1.5", "1e3"])
def test_read_item_with_non_integer_id_returns_422(client: TestClient, item_id: str) -> None:
    response = client.get(f"/items/{item_id}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "item_id"]


# --- PUT /items/{item_id} ---

SAME = {"title": "Same", "description": "same"}


def test_replace_item_replaces_all_fields_and_moves_updated_at(client: TestClient) -> None:
    item = create(client, "Old", description="old")

    response = client.put(f"/items/{item['id']}", json={"title": "New"})

    assert response.status_code == 200
    replaced = response.json()
    assert replaced["title"] == "New"
    assert replaced["description"] is None, "an omitted description becomes null"
    assert replaced["id"] == item["id"] and replaced["created_at"] == item["created_at"]
    assert parse_utc(replaced["updated_at"]) > parse_utc(item["updated_at"])
    assert replaced["version"] == 2 and response.headers["etag"] == '"2"'
    assert client.get(f"/items/{item['id']}").json() == replaced


def test_replace_item_keeping_its_own_title_is_not_a_conflict(client: TestClient) -> None:
    item = create(client, "Mine")
    assert client.put(f"/items/{item['id']}", json={"title": "Mine", "description": "x"}).status_code == 200


@pytest.mark.parametrize(
    "body", [{}, {"title": ""}, {"title": None}, {"title": "t" * 101}, {"title": "ok", "description": "d" * 1001}]
)
def test_replace_item_with_invalid_body_returns_422(client: TestClient, body: dict) -> None:
    item = create(client)
    assert client.put(f"/items/{item['id']}", json=body).status_code == 422
    assert client.get(f"/items/{item['id']}").json() == item


def test_replace_item_ignores_a_client_sent_id(client: TestClient) -> None:
    item = create(client)
    response = client.put(f"/items/{item['id']}", json={"title": "New", "id": 777})
    assert response.json()["id"] == item["id"]


# --- PATCH /items/{item_id} ---


def test_update_item_changes_only_the_fields_sent(client: TestClient) -> None:
    item = create(client, "Old", description="keep me")

    response = client.patch(f"/items/{item['id']}", json={"title": "New"})

    assert response.status_code == 200
    updated = response.json()
    assert updated["title"] == "New" and updated["description"] == "keep me"
    assert parse_utc(updated["updated_at"]) > parse_utc(item["updated_at"])
    assert updated["created_at"] == item["created_at"]


def test_update_item_with_null_description_clears_it(client: TestClient) -> None:
    item = create(client, "Old", description="clear me")
    response = client.patch(f"/items/{item['id']}", json={"description": None})
    assert response.status_code == 200
    assert response.json()["description"] is None and response.json()["title"] == "Old"


@pytest.mark.parametrize(
    "method, body",
    [("PATCH", {}), ("PATCH", {"title": "Same"}), ("PATCH", {"description": "same"}), ("PUT", SAME)],
    ids=["patch-nothing", "patch-same-title", "patch-same-description", "put-the-current-state"],
)
def test_a_write_that_changes_nothing_writes_nothing(client: TestClient, method: str, body: dict) -> None:
    item = create(client, **SAME)

    response = client.request(method, f"/items/{item['id']}", json=body)

    assert response.status_code == 200
    assert response.json() == item, "version and updated_at stay as they were"
    assert response.headers["etag"] == '"1"'
    assert client.get(f"/items/{item['id']}").json() == item


def test_update_item_with_null_title_returns_422(client: TestClient) -> None:
    item = create(client)
    response = client.patch(f"/items/{item['id']}", json={"title": None})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


@pytest.mark.parametrize("body", [{"title": ""}, {"title": "t" * 101}, {"description": "d" * 1001}, {"title": 5}])
def test_update_item_with_invalid_fields_returns_422(client: TestClient, body: dict) -> None:
    item = create(client)
    assert client.patch(f"/items/{item['id']}", json=body).status_code == 422
    assert client.get(f"/items/{item['id']}").json() == item


# --- PUT and PATCH alike ---


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_changing_missing_item_returns_404(client: TestClient, method: str) -> None:
    response = client.request(method, "/items/999999", json={"title": "New"})
    assert response.status_code == 404 and response.json() == {"detail": "Item not found"}


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_changing_item_to_a_duplicate_title_returns_409_and_changes_nothing(client: TestClient, method: str) -> None:
    create(client, "Taken")
    item = create(client, "Free", description="keep")

    response = client.request(method, f"/items/{item['id']}", json={"title": "Taken", "description": "lost"})

    assert response.status_code == 409
    assert response.json() == {"detail": "An item with this title already exists"}
    assert client.get(f"/items/{item['id']}").json() == item


# --- Versions, ETags and conditional requests ---


def test_every_change_counts_the_version_up_and_every_single_item_response_carries_its_etag(
    client: TestClient,
) -> None:
    item = create(client, "Counted")
    url = f"/items/{item['id']}"

    responses = [
        client.patch(url, json={"description": "one"}),
        client.put(url, json={"title": "Counted", "description": "two"}),
        client.patch(url, json={"title": "Recounted"}),
        client.get(url),
    ]

    assert [response.json()["version"] for response in responses] == [2, 3, 4, 4]
    assert [response.headers["etag"] for response in responses] == ['"2"', '"3"', '"4"', '"4"']


@pytest.mark.parametrize("if_none_match", ['"1"', 'W/"1"', '"7", "1"', "*"])
def test_a_read_whose_etag_the_client_has_answers_304_with_no_body(client: TestClient, if_none_match: str) -> None:
    item = create(client)

    response = client.get(f"/items/{item['id']}", headers={"If-None-Match": if_none_match})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == '"1"'


def test_a_read_whose_etag_is_stale_answers_200_with_the_new_version(client: TestClient) -> None:
    item = create(client)
    client.patch(f"/items/{item['id']}", json={"description": "changed"})

    response = client.get(f"/items/{item['id']}", headers={"If-None-Match": '"1"'})

    assert response.status_code == 200
    assert response.json()["description"] == "changed" and response.headers["etag"] == '"2"'


CHANGES = {"PUT": {"title": "Mine", "description": "lost"}, "PATCH": {"description": "lost"}, "DELETE": None}


@pytest.mark.parametrize("method", CHANGES)
def test_a_write_with_a_stale_if_match_answers_412_and_changes_nothing(client: TestClient, method: str) -> None:
    item = create(client, "Mine")
    changed = client.patch(f"/items/{item['id']}", json={"description": "theirs"}).json()

    response = client.request(method, f"/items/{item['id']}", json=CHANGES[method], headers={"If-Match": '"1"'})

    assert response.status_code == 412
    assert response.json() == {"detail": "The item has changed since you read it: read it again"}
    assert client.get(f"/items/{item['id']}").json() == changed


@contextmanager
def another_write_just_before(api: App, verb: str, item_id: int) -> Iterator[list[str]]:
    """Another writer gets in between a request's read and its write: just before the request's UPDATE or
    DELETE (`verb`), the row's version moves on (here on the request's own connection, so on any database)."""
    sync_engine = sync_engine_of(api.engine)
    got_in_between: list[str] = []

    def write_in_between(connection, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith(verb) and not got_in_between:
            got_in_between.append(statement)
            connection.exec_driver_sql(f"UPDATE item SET version = version + 1 WHERE id = {item_id:d}")

    event.listen(sync_engine, "before_cursor_execute", write_in_between)
    try:
        yield got_in_between
    finally:
        event.remove(sync_engine, "before_cursor_execute", write_in_between)


VERBS = {"PUT": "UPDATE item SET", "PATCH": "UPDATE item SET", "DELETE": "DELETE FROM item"}


@pytest.mark.parametrize("method", CHANGES)
def test_a_write_with_if_match_whose_row_moved_on_after_its_read_answers_412_and_changes_nothing(
    api: App, method: str
) -> None:
    """The version the client saw is checked by the statement that writes, not only by the read before it."""
    item = create(api.client, "Mine")

    with another_write_just_before(api, VERBS[method], item["id"]) as got_in_between:
        response = api.client.request(method, f"/items/{item['id']}", json=CHANGES[method], headers={"If-Match": '"1"'})

    assert got_in_between
    assert response.status_code == 412
    assert response.json() == {"detail": "The item has changed since you read it: read it again"}
    assert api.client.get(f"/items/{item['id']}").json() == item


@pytest.mark.parametrize("method", CHANGES)
def test_a_write_without_if_match_whose_row_moved_on_after_its_read_still_applies(api: App, method: str) -> None:
    """Without If-Match a write is unconditional: it applies to the latest version, and counts it."""
    item = create(api.client, "Mine")

    with another_write_just_before(api, VERBS[method], item["id"]) as got_in_between:
        response = api.client.request(method, f"/items/{item['id']}", json=CHANGES[method])

    assert got_in_between
    if method == "DELETE":
        assert response.status_code == 204
        assert api.client.get(f"/items/{item['id']}").status_code == 404
    else:
        assert response.status_code == 200, response.text
        assert response.json()["description"] == "lost" and response.json()["version"] == 3
        assert api.client.get(f"/items/{item['id']}").json() == response.json()


@pytest.mark.parametrize("method", CHANGES)
@pytest.mark.parametrize("if_match", ['"2"', "*", '"1", "2"', ' "9" ,"2" '], ids=["current", "star", "list", "spaces"])
def test_a_write_whose_if_match_names_the_current_etag_or_star_proceeds(
    client: TestClient, method: str, if_match: str
) -> None:
    item = create(client, "Mine")
    client.patch(f"/items/{item['id']}", json={"description": "theirs"})

    response = client.request(method, f"/items/{item['id']}", json=CHANGES[method], headers={"If-Match": if_match})

    assert response.status_code == (204 if method == "DELETE" else 200), response.text
    if method == "DELETE":
        assert client.get(f"/items/{item['id']}").status_code == 404
    else:
        assert response.json()["description"] == "lost" and response.headers["etag"] == '"3"'


def test_a_weak_etag_never_matches_if_match(client: TestClient) -> None:
    item = create(client)

    response = client.patch(f"/items/{item['id']}", json={"description": "x"}, headers={"If-Match": 'W/"1"'})

    assert response.status_code == 412


@pytest.mark.parametrize("method", CHANGES)
def test_if_match_on_a_missing_item_is_404(client: TestClient, method: str) -> None:
    response = client.request(method, "/items/999999", json=CHANGES[method], headers={"If-Match": "*"})
    assert (response.status_code, response.json()) == (404, {"detail": "Item not found"})


def test_the_lost_update_two_clients_both_saw_version_1_the_second_gets_412(client: TestClient) -> None:
    item = create(client, "Shared", description="v1")
    seen = client.get(f"/items/{item['id']}").headers["etag"]

    first = client.put(
        f"/items/{item['id']}", json={"title": "Shared", "description": "Alice"}, headers={"If-Match": seen}
    )
    second = client.put(
        f"/items/{item['id']}", json={"title": "Shared", "description": "Bob"}, headers={"If-Match": seen}
    )

    assert (first.status_code, second.status_code) == (200, 412)
    assert client.get(f"/items/{item['id']}").json()["description"] == "Alice"


# --- Tags on items ---


def test_an_item_is_created_with_its_tags_sorted_and_counted_once(client: TestClient) -> None:
    item = create(client, "Tagged", tags=["work", "home", "work"])

    assert item["tags"] == ["home", "work"]
    assert client.get(f"/items/{item['id']}").json()["tags"] == ["home", "work"]
    assert client.get("/items/").json()[0]["tags"] == ["home", "work"]


@pytest.mark.parametrize(
    "tags, status",
    [
        ([f"t{n}" for n in range(20)] * 2, 201),
        ([f"t{n}" for n in range(21)], 422),
        ([""], 422),
        (["t" * 50], 201),
        (["t" * 51], 422),
        (["nul\u0000"], 422),
        ("home", 422),
    ],
    ids=["20-distinct-repeated", "21-distinct", "empty-name", "50-characters", "51-characters", "nul", "not-a-list"],
)
def test_tags_are_at_most_20_distinct_names_of_1_to_50_characters(
    client: TestClient, tags: object, status: int
) -> None:
    response = client.post("/items/", json={"title": "Tagged", "tags": tags})

    assert response.status_code == status, response.text
    if status == 422:
        assert response.json()["detail"][0]["loc"][:2] == ["body", "tags"]
        assert client.get("/tags/").json() == []


def test_put_without_tags_clears_them_and_patch_without_tags_keeps_them(client: TestClient) -> None:
    item = create(client, "Tagged", tags=["home"])

    patched = client.patch(f"/items/{item['id']}", json={"description": "kept tags"}).json()
    put = client.put(f"/items/{item['id']}", json={"title": "Tagged"}).json()

    assert patched["tags"] == ["home"]
    assert put["tags"] == [] and put["version"] == 3


def test_patch_with_tags_replaces_them_and_counts_the_version_up(client: TestClient) -> None:
    item = create(client, "Tagged", tags=["home", "work"])

    response = client.patch(f"/items/{item['id']}", json={"tags": ["urgent", "home"]})

    assert response.json()["tags"] == ["home", "urgent"]
    assert response.json()["version"] == 2 and response.headers["etag"] == '"2"'


def test_patch_with_the_same_tags_in_another_order_changes_nothing(client: TestClient) -> None:
    item = create(client, "Tagged", tags=["home", "work"])

    response = client.patch(f"/items/{item['id']}", json={"tags": ["work", "home", "home"]})

    assert response.json() == item


def test_a_tag_filter_lists_only_the_items_that_have_it_and_counts_them(client: TestClient) -> None:
    home = [create(client, f"home {n}", tags=["home"])["id"] for n in range(3)]
    create(client, "work", tags=["work"])

    response = client.get("/items/", params={"tag": "home", "limit": 2})
    unknown = client.get("/items/", params={"tag": "nowhere"})

    assert [item["id"] for item in response.json()] == home[:2]
    assert response.headers["x-total-count"] == "3"
    assert (unknown.json(), unknown.headers["x-total-count"]) == ([], "0")


def test_deleting_an_item_removes_its_links_and_never_a_tag(api: App) -> None:
    item = create(api.client, "Tagged", tags=["home"])

    assert api.client.delete(f"/items/{item['id']}").status_code == 204

    assert api.client.get("/tags/home").json() == {"name": "home", "item_count": 0}
    assert api.count_rows("SELECT count(*) FROM item_tag") == 0


def test_the_articles_case_a_taken_title_with_new_tags_leaves_none_of_those_tags(api: App) -> None:
    create(api.client, "Taken")

    response = api.client.post("/items/", json={"title": "Taken", "tags": ["brand-new", "also-new"]})

    assert response.status_code == 409
    assert response.json() == {"detail": "An item with this title already exists"}
    assert api.client.get("/tags/").json() == []
    assert api.count_rows("SELECT count(*) FROM tag") == 0


def test_a_failed_replace_leaves_no_part_of_it_neither_tags_nor_fields(api: App) -> None:
    create(api.client, "Taken")
    item = create(api.client, "Mine", tags=["old"])

    response = api.client.put(f"/items/{item['id']}", json={"title": "Taken", "tags": ["new"]})

    assert response.status_code == 409
    assert api.client.get(f"/items/{item['id']}").json() == item
    assert [tag["name"] for tag in api.client.get("/tags/").json()] == ["old"]


class StatementCount:
    """Counts the SQL statements an engine runs."""

    def __init__(self, api: App) -> None:
        self.count = 0
        event.listen(sync_engine_of(api.engine), "before_cursor_execute", self.counted)

    def counted(self, *_: object) -> None:
        self.count += 1


def statements_for(api: App, request: Callable[[], object]) -> int:
    counter = StatementCount(api)
    request()
    return counter.count


def test_a_page_of_100_items_with_their_tags_takes_as_many_statements_as_a_page_of_1(api: App) -> None:
    for n in range(100):
        create(api.client, f"item {n}", tags=[f"a{n}", f"b{n}", "shared"])

    one = statements_for(api, lambda: api.client.get("/items/", params={"limit": 1}))
    hundred = statements_for(api, lambda: api.client.get("/items/", params={"limit": 100}))
    filtered = statements_for(api, lambda: api.client.get("/items/", params={"tag": "shared"}))

    assert one == hundred == filtered == 1
    assert len(api.client.get("/items/").json()[99]["tags"]) == 3


def test_reading_an_items_tags_without_loading_them_is_an_error_not_a_hidden_query(api: App) -> None:
    item_id = create(api.client, "Tagged", tags=["home"])["id"]

    def lazy_load(session: Session) -> None:
        session.get(Item, item_id).tags  # noqa: B018 - the access itself is the test

    with pytest.raises(InvalidRequestError, match="lazy='raise'"):
        api.run(in_a_session, api.engine, lazy_load)


async def in_a_session(engine: Engine | AsyncEngine, work: Callable[[Session], None]) -> None:
    if isinstance(engine, AsyncEngine):
        async with AsyncSession(engine) as session:
            await session.run_sync(work)
    else:
        with Session(engine) as session:
            work(session)


# --- DELETE /items/{item_id} ---


def test_delete_item_returns_204_with_empty_body_and_removes_it(client: TestClient) -> None:
    item = create(client)

    response = client.delete(f"/items/{item['id']}")

    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/items/{item['id']}").status_code == 404
    assert client.get("/items/").headers["x-total-count"] == "0"


def test_delete_missing_item_returns_404(client: TestClient) -> None:
    response = client.delete("/items/999999")
    assert response.status_code == 404 and response.json() == {"detail": "Item not found"}


def test_deleted_title_can_be_used_again(client: TestClient) -> None:
    item = create(client, "Reuse")
    client.delete(f"/items/{item['id']}")
    assert create(client, "Reuse")["id"] != item["id"]


# --- Errors every route shares ---


def test_unknown_route_returns_json_404(client: TestClient) -> None:
    response = client.get("/nothing-here")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_wrong_method_returns_json_405(client: TestClient) -> None:
    response = client.patch("/items/")
    assert response.status_code == 405 and "detail" in response.json()
