"""Hostile input, in every mode: a bounded schemathesis run, injection-shaped and exotic text, huge values, leaks."""

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.conftest import App, create

# Words that would show a database error, a driver or a traceback reaching the client.
LEAKS = ("SELECT", "INSERT", "UPDATE item", "Traceback", "sqlalchemy", "psycopg", "asyncpg")

# Reproducible and bounded: the same examples on every run, no shrinking, no example database on disk.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
ITEM_OPERATIONS = {
    "POST /items/",
    "GET /items/",
    "GET /items/{item_id}",
    "PUT /items/{item_id}",
    "PATCH /items/{item_id}",
    "DELETE /items/{item_id}",
}


def assert_safe_error(response: httpx.Response) -> None:
    """An error answer is JSON with a `detail`, and says nothing about SQL, drivers or tracebacks."""
    assert response.headers.get("content-type") == "application/json", (response.status_code, response.text[:200])
    detail = response.json()["detail"]
    if response.status_code == 422:
        # A 422 echoes the client's own input, which may hold any word: only the rest could leak.
        detail = [{key: value for key, value in error.items() if key != "input"} for error in detail]
    leaked = [word for word in LEAKS if word in str(detail)]
    assert not leaked, f"{leaked} in {response.status_code} {response.text[:300]}"


# --- A bounded schemathesis run over the OpenAPI schema ---


def request_of(case: Case, client: TestClient) -> dict:
    """The case as keyword arguments for the test's own client, so requests reach the app on the fixture's loop."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    kwargs.pop("cookies", None)  # none are generated, and httpx deprecates per-request cookies
    if "data" in kwargs:
        kwargs["content"] = kwargs.pop("data")
    return kwargs


@pytest.mark.parametrize("generation_mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_schema(
    api: App, generation_mode: GenerationMode, subtests: pytest.Subtests
) -> None:
    schema = schemathesis.openapi.from_dict(api.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    # Nothing to make invalid: health has no inputs; a tag's name in a path has rules (1 to 50 characters, no
    # NUL) that schemathesis cannot break within a URL, so a name read or deleted is valid or a 404.
    nothing_invalid = {"GET /health", "GET /tags/{name}", "DELETE /tags/{name}"}
    fuzzed = [op for op in operations if generation_mode is GenerationMode.POSITIVE or op.label not in nothing_invalid]
    assert ITEM_OPERATIONS <= {op.label for op in fuzzed}

    for operation in fuzzed:

        @FUZZ
        @given(case=operation.as_strategy(generation_mode))
        def answers_within_the_schema(case: Case) -> None:
            response = api.client.request(**request_of(case, api.client))
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                assert_safe_error(response)

        # A subtest per operation: one failing operation does not hide the others.
        with subtests.test(operation.label):
            answers_within_the_schema()


# --- Injection-shaped and exotic text is stored literally ---

INJECTIONS = [
    "'; DROP TABLE item; --",
    '" OR 1=1 --',
    "Robert'); DROP TABLE item;--",
    "1' UNION SELECT id, title, title, created_at, updated_at FROM item --",
    "%' OR '%'='",
    "\\'; DELETE FROM item; --",
    # Placeholders of every driver's parameter style: they must reach the database as text, never as markers.
    "%s %(title)s $1 :title ?",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_sql_injection_shaped_text_is_stored_literally_and_the_table_survives(api: App, value: str) -> None:
    create(api.client, "first")
    item = create(api.client, value, description=value)

    stored = api.client.get(f"/items/{item['id']}").json()

    assert (stored["title"], stored["description"]) == (value, value)
    assert api.count_rows() == 2
    assert api.client.get("/items/").headers["x-total-count"] == "2"


UNICODE = {
    "zwj-family": "👨\u200d👩\u200d👧\u200d👦 family",
    "zwj-flag": "🏳️\u200d🌈 and 🇺🇳",
    "astral-plane": "𝕳𝖊𝖑𝖑𝖔 𐍈 𓀀 🀄 \U0010fffd",
    "arabic-rtl": "مرحبا بالعالم",
    "hebrew-rtl": "שלום עולם",
    "bidi-override": "\u202eevil.exe\u202c and \u2067isolate\u2069",
    "combining-marks": "e\u0301 Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d",
    "zero-width-and-bom": "a\u200bb\u200cc\u200dd\ufeffe",
    "padding-and-controls": "  \t tab\nnewline\r\x1b[31mred\x7f  ",
    "noncharacters": "\ufffe\uffff\U0001fffe",
}


@pytest.mark.parametrize("value", UNICODE.values(), ids=UNICODE.keys())
def test_unicode_title_and_description_are_stored_literally(client: TestClient, value: str) -> None:
    item = create(client, value, description=value)

    stored = client.get(f"/items/{item['id']}").json()

    assert (stored["title"], stored["description"]) == (value, value)
    assert client.get("/items/").json()[0]["title"] == value


def test_a_title_of_100_four_byte_emoji_is_accepted_because_max_length_counts_code_points(client: TestClient) -> None:
    title = "\U0001f600" * 100
    assert len(title.encode("utf-8")) == 400

    item = create(client, title)

    assert client.get(f"/items/{item['id']}").json()["title"] == title
    too_long = client.post("/items/", json={"title": "\U0001f600" * 101})
    assert too_long.status_code == 422
    assert_safe_error(too_long)


def test_max_length_counts_code_points_not_grapheme_clusters(client: TestClient) -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"  # one grapheme, seven code points
    assert create(client, family * 14)["title"] == family * 14  # 98 code points
    response = client.post("/items/", json={"title": family * 15})  # 105 code points
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]
    assert_safe_error(response)


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("POST", {"title": "\u0000"}, "title"),
        ("POST", {"title": "nul\u0000inside"}, "title"),
        ("POST", {"title": "ok", "description": "trailing nul\u0000"}, "description"),
        ("PUT", {"title": "nul\u0000inside"}, "title"),
        ("PATCH", {"title": "nul\u0000inside"}, "title"),
        ("PATCH", {"description": "\u0000"}, "description"),
    ],
)
def test_nul_characters_are_rejected_with_422(client: TestClient, method: str, body: dict, field: str) -> None:
    item = create(client, "Before")
    url = "/items/" if method == "POST" else f"/items/{item['id']}"

    response = client.request(method, url, json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert_safe_error(response)
    assert client.get("/items/").json() == [item]


@pytest.mark.parametrize(("path", "parameter"), [("/items/", "tag"), ("/tags/", "after")])
def test_a_nul_character_in_a_query_parameter_is_a_422_on_every_database(
    client: TestClient, path: str, parameter: str
) -> None:
    """PostgreSQL refuses NUL in text (psycopg: DataError; asyncpg: an error SQLAlchemy does not classify), SQLite
    takes it: the rule is checked before any SQL, so every database answers the same."""
    response = client.get(path, params={parameter: "nul\u0000"})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", parameter]
    assert_safe_error(response)


# Valid JSON for Python's parser that no JSON response can echo back: lone surrogates, NaN and infinities.
UNRENDERABLE = {
    "lone-surrogate-title": b'{"title": "a\\ud800b"}',
    "lone-low-surrogate-title": b'{"title": "\\udfff"}',
    "lone-surrogate-description": b'{"title": "ok", "description": "\\ud83d"}',
    "nan-title": b'{"title": NaN}',
    "infinity-description": b'{"title": "ok", "description": Infinity}',
    "overflowing-float-description": b'{"title": "ok", "description": 1e999}',
}


@pytest.mark.parametrize("body", UNRENDERABLE.values(), ids=UNRENDERABLE.keys())
def test_values_that_cannot_be_echoed_back_are_rejected_with_422_not_500(client: TestClient, body: bytes) -> None:
    response = client.post("/items/", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    assert_safe_error(response)
    assert client.get("/items/").headers["x-total-count"] == "0"


# --- Huge values ---


def test_a_10000_character_title_is_rejected_with_422(client: TestClient) -> None:
    response = client.post("/items/", json={"title": "t" * 10_000})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]
    assert_safe_error(response)


def test_a_1000001_character_description_under_the_body_limit_is_rejected_with_422(client: TestClient) -> None:
    body = {"title": "Long", "description": "d" * 1_000_001}

    response = client.post("/items/", json=body)

    assert len(response.request.content) < 1024 * 1024
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "description"]
    assert_safe_error(response)
    assert client.get("/items/").headers["x-total-count"] == "0"


# item.id is a 64-bit integer: any id in that range that no item has is a 404, anything beyond it a 422.
IDS_NO_ITEM_HAS = [0, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63)]
IDS_BEYOND_64_BITS = [2**63, 10**30, -(2**63) - 1, -(10**30)]
METHODS = {"GET": None, "PUT": {"title": "New"}, "PATCH": {"title": "New"}, "DELETE": None}


@pytest.mark.parametrize("item_id", IDS_NO_ITEM_HAS, ids=str)
def test_a_64_bit_id_that_no_item_has_gets_404(client: TestClient, item_id: int) -> None:
    create(client, "Existing")

    responses = {method: client.request(method, f"/items/{item_id}", json=body) for method, body in METHODS.items()}

    answers = {method: (response.status_code, response.text) for method, response in responses.items()}
    assert answers == {method: (404, '{"detail":"Item not found"}') for method in METHODS}
    assert client.get("/items/").json()[0]["title"] == "Existing"


@pytest.mark.parametrize("item_id", IDS_BEYOND_64_BITS, ids=str)
def test_an_id_beyond_64_bits_gets_422_before_any_query(client: TestClient, item_id: int) -> None:
    for method, body in METHODS.items():
        response = client.request(method, f"/items/{item_id}", json=body)
        assert response.status_code == 422, (method, response.text)
        assert response.json()["detail"][0]["loc"] == ["path", "item_id"]
        assert_safe_error(response)


@pytest.mark.parametrize("skip", [2**31, 2**63 - 1], ids=str)
def test_a_huge_skip_within_64_bits_gives_an_empty_page(client: TestClient, skip: int) -> None:
    create(client, "Only")

    response = client.get("/items/", params={"skip": skip})

    assert response.status_code == 200, response.text
    assert response.json() == [] and response.headers["x-total-count"] == "1"


@pytest.mark.parametrize("skip", [2**63, 10**30], ids=str)
def test_a_skip_beyond_64_bits_gets_422_before_any_query(client: TestClient, skip: int) -> None:
    response = client.get("/items/", params={"skip": skip})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "skip"]
    assert_safe_error(response)


# --- Errors never leak SQL ---


def test_a_table_missing_from_the_database_is_a_plain_500_that_says_nothing_about_sql(api: App) -> None:
    create(api.client, "Doomed")
    # PostgreSQL refuses to drop a table another one references (item_tag) unless told to.
    api.execute("DROP TABLE item CASCADE" if api.database.backend == "postgresql" else "DROP TABLE item")

    responses = [
        api.client.get("/items/"),
        api.client.get("/items/1"),
        api.client.post("/items/", json={"title": "New"}),
        api.client.patch("/items/1", json={"title": "Renamed"}),
        api.client.delete("/items/1"),
    ]

    for response in responses:
        # The database answers: the schema is behind the code, which no retry fixes (never 503).
        assert response.status_code == 500, response.text
        assert_safe_error(response)
        assert response.json() == {"detail": "Internal Server Error"}


# --- The body limit, with a Content-Length header (without one: tests/test_server.py) ---


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_a_body_over_1_mib_with_content_length_is_refused_with_a_json_413(client: TestClient, method: str) -> None:
    item = create(client, "Kept")
    url = "/items/" if method == "POST" else f"/items/{item['id']}"
    body = b'{"title": "' + b"x" * (1024 * 1024) + b'"}'

    response = client.request(method, url, content=body, headers={"content-type": "application/json"})

    assert response.request.headers["content-length"] == str(len(body))
    assert response.status_code == 413
    assert_safe_error(response)
    assert response.json() == {"detail": "Request body too large"}
    assert client.get("/items/").json() == [item]
