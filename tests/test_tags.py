"""The tags HTTP contract, in every mode: list, read, rename and delete; what a rename or a delete does to items.

How items take tags (POST, PUT, PATCH, ?tag=) is in tests/test_items.py; twenty requests bringing the same new
tag at once, in tests/test_item_races.py.
"""

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from tests.conftest import create


def test_tags_are_listed_by_name_with_their_item_counts_and_a_total(client: TestClient) -> None:
    create(client, "one", tags=["work", "home"])
    create(client, "two", tags=["home"])
    create(client, "three", tags=["urgent"])

    response = client.get("/tags/")
    page = client.get("/tags/", params={"skip": 1, "limit": 1})

    assert response.json() == [
        {"name": "home", "item_count": 2},
        {"name": "urgent", "item_count": 1},
        {"name": "work", "item_count": 1},
    ]
    assert response.headers["x-total-count"] == "3"
    assert (page.json(), page.headers["x-total-count"]) == ([{"name": "urgent", "item_count": 1}], "3")


def test_no_tags_is_an_empty_list(client: TestClient) -> None:
    response = client.get("/tags/")
    assert (response.json(), response.headers["x-total-count"]) == ([], "0")


def test_a_tag_is_read_by_name_and_an_unknown_one_is_404(client: TestClient) -> None:
    create(client, "one", tags=["home", "a/b"])

    assert client.get("/tags/home").json() == {"name": "home", "item_count": 1}
    assert client.get("/tags/a/b").json() == {"name": "a/b", "item_count": 1}
    missing = client.get("/tags/nowhere")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Tag not found"})


def test_renaming_a_tag_shows_the_new_name_on_every_item_and_moves_their_etags(client: TestClient) -> None:
    first = create(client, "one", tags=["hom", "work"])
    second = create(client, "two", tags=["hom"])
    other = create(client, "three", tags=["work"])

    response = client.patch("/tags/hom", json={"name": "home"})

    assert response.status_code == 200
    assert response.json() == {"name": "home", "item_count": 2}
    for before in (first, second):
        after = client.get(f"/items/{before['id']}")
        assert "home" in after.json()["tags"] and "hom" not in after.json()["tags"]
        assert after.json()["version"] == before["version"] + 1, "a cached copy with the old name is stale"
        assert datetime.fromisoformat(after.json()["updated_at"]) > datetime.fromisoformat(before["updated_at"])
    assert client.get(f"/items/{other['id']}").json() == other
    assert client.get("/tags/hom").status_code == 404


def test_renaming_a_tag_to_a_taken_name_is_409_and_changes_nothing(client: TestClient) -> None:
    item = create(client, "one", tags=["home", "work"])

    response = client.patch("/tags/home", json={"name": "work"})

    assert (response.status_code, response.json()) == (409, {"detail": "A tag with this name already exists"})
    assert client.get(f"/items/{item['id']}").json() == item


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "t" * 51}, {"name": "nul\u0000"}, {}])
def test_renaming_a_tag_to_an_invalid_name_is_422(client: TestClient, body: dict) -> None:
    create(client, "one", tags=["home"])

    response = client.patch("/tags/home", json=body)

    assert response.status_code == 422
    assert client.get("/tags/home").status_code == 200


def test_renaming_or_deleting_an_unknown_tag_is_404(client: TestClient) -> None:
    assert client.patch("/tags/nowhere", json={"name": "x"}).status_code == 404
    assert client.delete("/tags/nowhere").status_code == 404


def test_deleting_a_tag_takes_it_off_every_item_and_the_items_stay(client: TestClient) -> None:
    item = create(client, "one", tags=["home", "work"])

    response = client.delete("/tags/home")

    assert (response.status_code, response.content) == (204, b"")
    after = client.get(f"/items/{item['id']}").json()
    assert after["tags"] == ["work"] and after["version"] == 2
    assert datetime.fromisoformat(after["updated_at"]) > datetime.fromisoformat(item["updated_at"])
    assert client.get("/tags/home").status_code == 404
    assert client.get("/items/").headers["x-total-count"] == "1"


def test_a_full_page_of_tags_links_to_the_next_one_by_name(client: TestClient) -> None:
    create(client, "one", tags=["c", "a", "b"])

    first = client.get("/tags/", params={"limit": 2})
    rest = client.get(first.headers["link"].split(";")[0].strip("<>"))

    assert [tag["name"] for tag in first.json()] == ["a", "b"]
    assert [tag["name"] for tag in rest.json()] == ["c"] and "link" not in rest.headers
