"""The API's own documentation: the OpenAPI schema teaches, and /docs and /redoc work offline."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Database
from tests.live import running_server

# path, method, operation id (a generated client's method name), error statuses documented
OPERATIONS = [
    ("/items/", "post", "create_item", {400, 409, 413, 422, 503}),
    ("/items/", "get", "list_items", {422, 503}),
    ("/items/{item_id}", "get", "read_item", {404, 422, 503}),
    ("/items/{item_id}", "put", "replace_item", {400, 404, 409, 412, 413, 422, 503}),
    ("/items/{item_id}", "patch", "update_item", {400, 404, 409, 412, 413, 422, 503}),
    ("/items/{item_id}", "delete", "delete_item", {404, 412, 422, 503}),
    ("/tags/", "get", "list_tags", {422, 503}),
    ("/tags/{name}", "get", "read_tag", {404, 422, 503}),
    ("/tags/{name}", "patch", "rename_tag", {400, 404, 409, 413, 422, 503}),
    ("/tags/{name}", "delete", "delete_tag", {404, 422, 503}),
]


@pytest.fixture
def schema(client: TestClient) -> dict:
    return client.get("/openapi.json").json()


def test_openapi_has_title_version_and_a_description_linking_the_workshop(schema: dict) -> None:
    info = schema["info"]
    assert info["title"] == "Items API" and info["version"]
    assert "[workshop](/workshop)" in info["description"]


def test_every_feature_tag_has_a_description(schema: dict) -> None:
    tags = {tag["name"]: tag for tag in schema["tags"]}
    assert tags["items"]["description"] and tags["tags"]["description"]


@pytest.mark.parametrize(
    "path, method, operation_id, errors", OPERATIONS, ids=[f"{m} {p}" for p, m, _, _ in OPERATIONS]
)
def test_every_operation_is_documented_with_a_clean_id_its_errors_and_examples(
    schema: dict, path: str, method: str, operation_id: str, errors: set[int]
) -> None:
    operation = schema["paths"][path][method]

    assert operation["operationId"] == operation_id
    assert operation["tags"] == [path.split("/")[1]]
    assert operation["summary"]
    assert operation["description"].endswith(".") and operation["description"].count(". ") == 0
    documented = {int(code) for code in operation["responses"] if code[0] in "45"}
    assert documented == errors
    for code in errors - {422}:
        content = operation["responses"][str(code)]["content"]["application/json"]
        # One error model for every error but 422: a generated client parses them all into a typed object.
        assert content["schema"] == {"$ref": "#/components/schemas/Error"}
        assert "detail" in content["example"]


@pytest.mark.parametrize(
    "path, method, header",
    [
        ("/items/{item_id}", "get", "if-none-match"),
        ("/items/{item_id}", "put", "if-match"),
        ("/items/{item_id}", "patch", "if-match"),
        ("/items/{item_id}", "delete", "if-match"),
    ],
)
def test_conditional_headers_are_documented_parameters(schema: dict, path: str, method: str, header: str) -> None:
    operation = schema["paths"][path][method]
    headers = {parameter["name"]: parameter for parameter in operation["parameters"] if parameter["in"] == "header"}
    assert headers[header]["description"]
    assert ("304" if header == "if-none-match" else "412") in operation["responses"]


def test_lists_document_their_total_and_link_headers(schema: dict) -> None:
    for path in ("/items/", "/tags/"):
        assert set(schema["paths"][path]["get"]["responses"]["200"]["headers"]) == {"X-Total-Count", "Link"}


@pytest.mark.parametrize("model", ["ItemIn", "ItemUpdate", "ItemOut"])
def test_request_and_response_models_carry_an_example(schema: dict, model: str) -> None:
    component = schema["components"]["schemas"][model]
    (example,) = component["examples"]
    assert set(example) <= set(component["properties"])


def test_request_bodies_show_constraints_examples_and_the_uniqueness_of_title(schema: dict) -> None:
    fields = schema["components"]["schemas"]["ItemIn"]["properties"]
    assert fields["title"]["maxLength"] == 100 and fields["title"]["minLength"] == 1
    assert "unique" in fields["title"]["description"]
    assert fields["title"]["examples"]
    description = next(option for option in fields["description"]["anyOf"] if option["type"] == "string")
    assert description["maxLength"] == 1000


def test_response_schema_marks_every_field_as_always_present(schema: dict) -> None:
    item = schema["components"]["schemas"]["ItemOut"]
    assert set(item["required"]) == {"id", "title", "description", "tags", "version", "created_at", "updated_at"}


def test_root_redirects_to_docs(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/docs"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_app_itself(client: TestClient, page: str) -> None:
    html = client.get(page).text

    assert not re.findall(r"https?://", html), "a CDN link would break the docs without internet access"
    assets = re.findall(r"""(?:src|href)=["']?(/docs-assets/[^"' >]+)""", html)
    assert assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_workshop_link_serves_the_workshop(client: TestClient) -> None:
    response = client.get("/workshop")
    assert response.status_code == 200
    assert response.text == (Path(__file__).parent.parent / "WORKSHOP.md").read_text()


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_swagger_ui_renders_every_operation_in_a_headless_browser(tmp_path: Path) -> None:
    database = Database("sync", "sqlite", f"sqlite:///{tmp_path / 'docs.db'}")
    with running_server(database.url) as server:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"{server.url}/docs",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    for summary in [
        "Create an item",
        "List items",
        "Read an item",
        "Replace an item",
        "Update an item",
        "Delete an item",
        "List tags",
        "Rename a tag",
    ]:
        assert summary in dom, f"{summary!r} is not rendered in /docs"
    assert dom.count('class="opblock ') >= 11
