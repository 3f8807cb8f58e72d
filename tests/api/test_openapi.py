"""The OpenAPI schema is part of the contract: every route is typed, secured (a Bearer key or the dashboard's
session cookie, as alternatives), tagged and lists its errors.

These tests read the schema the app serves at /openapi.json (and the pages that show it) without Redis: none of
these routes touches the app's services. tests/e2e/test_contract.py holds the live API to the same schema.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import STATUS, status_of
from api.settings import ApiSettings
from broker import errors as e
from broker.operations import LIST, LOAD, UNLOAD, UNLOAD_ALL
from broker.schemas import Operation

TAGS = {"nodes", "pool", "events", "operations", "session", "inference"}
ERROR_REF = "#/components/schemas/ErrorBody"
OPENAI_ERROR_REF = "#/components/schemas/OpenAIErrorBody"
INFERENCE = {("/v1/completions", "post"), ("/v1/chat/completions", "post")}
SESSION = {("/api/v1/session", "post"), ("/api/v1/session", "get"), ("/api/v1/session", "delete")}
PUBLIC = {("/healthz", "get"), *SESSION}
OPERATOR = {
    ("/api/v1/nodes/{fingerprint}/models/load", "post"),
    ("/api/v1/nodes/{fingerprint}/models/unload", "post"),
    ("/api/v1/nodes/{fingerprint}/models/unload-all", "post"),
    ("/v1/models/load", "post"),
    ("/v1/models/unload", "post"),
    ("/v1/models/unload-all", "post"),
}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield TestClient(create_app(ApiSettings(operator_keys="op-key", api_keys="read-key")))


@pytest.fixture(scope="module")
def schema(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/"), ref
    return schema["components"]["schemas"][ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def test_every_route_is_in_the_schema(schema: dict[str, Any]) -> None:
    found = {(path, method) for path, method, _ in operations(schema)}
    assert found == {
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/api/v1/events", "get"),
        ("/api/v1/nodes", "get"),
        ("/api/v1/nodes/{fingerprint}", "get"),
        ("/api/v1/nodes/{fingerprint}/models", "get"),
        ("/api/v1/nodes/{fingerprint}/catalog", "get"),
        ("/v1/models", "get"),
        ("/v1/models/status", "get"),
        ("/v1/models/{model_id}", "get"),
        *OPERATOR,
        *SESSION,
        *INFERENCE,
    }


def test_every_operation_has_a_summary_description_and_tag(schema: dict[str, Any]) -> None:
    ids = set()
    for path, method, op in operations(schema):
        assert op.get("summary") and op.get("description"), (path, method)
        assert len(op["tags"]) == 1 and op["tags"][0] in TAGS, (path, method)
        ids.add(op["operationId"])
    assert len(ids) == len(list(operations(schema)))
    assert {t["name"] for t in schema["tags"]} == TAGS


def test_a_bearer_key_or_the_session_cookie_guards_every_route_but_health_and_sign_in(
    schema: dict[str, Any],
) -> None:
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["type"] == "http" and schemes["HTTPBearer"]["scheme"] == "bearer"
    assert {k: schemes["APIKeyCookie"][k] for k in ("type", "in", "name")} == {
        "type": "apiKey",
        "in": "cookie",
        "name": "modelfleet_session",
    }
    for path, method, op in operations(schema):
        if (path, method) in PUBLIC:
            assert "security" not in op
            continue
        assert op["security"] == [{"HTTPBearer": []}, {"APIKeyCookie": []}], (path, method)
        statuses = op["responses"]
        assert "401" in statuses and "WWW-Authenticate" in statuses["401"]["headers"], (path, method)
        # 403: a read-only key on an operator route, or a signed-in page's change without its CSRF token.
        assert ("403" in statuses) == ((path, method) in OPERATOR or method not in ("get", "head")), (path, method)
        # The key is read through the scheme, not as a free header parameter a client would have to fill in.
        assert all(p["name"].lower() != "authorization" for p in op.get("parameters", ())), (path, method)


def test_session_routes_are_typed_with_their_errors(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
    sign_in = paths["/api/v1/session"]["post"]
    assert set(sign_in["responses"]) >= {"200", "401", "403", "422"}
    assert sign_in["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionInfo")
    catalog = paths["/api/v1/nodes/{fingerprint}/catalog"]["get"]["responses"]["200"]
    assert catalog["content"]["application/json"]["schema"]["$ref"].endswith("/NodeCatalog")


def test_every_error_status_answers_the_error_body(schema: dict[str, Any]) -> None:
    body = schema["components"]["schemas"]["ErrorBody"]
    assert set(body["required"]) == {"error", "code"} and set(body["properties"]) == {
        "success",
        "error",
        "code",
        "details",
    }
    for path, method, op in operations(schema):
        assert "500" in op["responses"], (path, method)
        for status, response in op["responses"].items():
            if int(status) < 400 or (path, status) == ("/healthz", "503"):
                continue
            ref = OPENAI_ERROR_REF if (path, method) in {*INFERENCE, ("/v1/models/{model_id}", "get")} else ERROR_REF
            assert response["content"]["application/json"]["schema"] == {"$ref": ref}, (path, status)
            assert "`" in response["description"], (path, status)  # names its codes


def test_inputs_document_their_422_and_job_routes_their_node_errors(schema: dict[str, Any]) -> None:
    for path, method, op in operations(schema):
        if "requestBody" in op or op.get("parameters"):
            assert "422" in op["responses"], (path, method)
        if "requestBody" in op:
            [media] = op["requestBody"]["content"]
            assert media == "application/json" and op["requestBody"]["required"] is True
    load = schema["paths"]["/api/v1/nodes/{fingerprint}/models/load"]["post"]["responses"]
    assert {"404", "409", "422", "502", "503", "504"} <= set(load)
    assert "`model_file_not_found`" in load["404"]["description"] and "`node_not_found`" in load["404"]["description"]
    assert "`insufficient_memory`" in load["409"]["description"]
    assert "`node_offline`" in load["503"]["description"] and "`timeout`" in load["504"]["description"]
    # OpenAI's statuses on the inference routes: a parameter no node runs is 400, a body that fails validation 422.
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "`context_length_exceeded`" in completions["400"]["description"]
    assert "`model_busy`" in completions["429"]["description"]
    assert "`invalid_request`" in completions["422"]["description"]


def test_success_answers_are_the_models_clients_receive(schema: dict[str, Any]) -> None:
    def answer(path: str, method: str = "get") -> dict[str, Any]:
        return schema["paths"][path][method]["responses"]["200"]["content"]  # type: ignore[no-any-return]

    for path, method, _ in operations(schema):
        if (path, method) == ("/api/v1/session", "delete"):
            assert set(schema["paths"][path][method]["responses"]["204"]) == {"description"}
            continue
        content = answer(path, method)
        if path in ("/metrics", "/api/v1/events"):
            continue
        if (path, method) in INFERENCE:  # JSON, or with `stream: true` Server-Sent Events
            assert set(content) == {"application/json", "text/event-stream"}, path
            assert "$ref" in content["application/json"]["schema"], path
            continue
        assert set(content) == {"application/json"}, path
        assert "$ref" in content["application/json"]["schema"], path
    nodes = "/api/v1/nodes/{fingerprint}/models"
    assert answer(nodes)["application/json"]["schema"]["$ref"].endswith(f"/{LIST.result.__name__}")
    assert answer(nodes + "/load", "post")["application/json"]["schema"]["$ref"].endswith(f"/{LOAD.result.__name__}")
    assert answer(nodes + "/unload", "post")["application/json"]["schema"]["$ref"].endswith(UNLOAD.result.__name__)
    assert answer(nodes + "/unload-all", "post")["application/json"]["schema"]["$ref"].endswith(
        UNLOAD_ALL.result.__name__
    )
    assert set(answer("/metrics")) == {
        "text/plain; version=0.0.4; charset=utf-8",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    }
    assert set(answer("/api/v1/events")) == {"text/event-stream"}

    # Node answers are camelCase, pool answers snake_case, as the two reference documents show them.
    load = resolve(schema, answer(nodes + "/load", "post")["application/json"]["schema"]["$ref"])
    assert {"modelId", "loadSeconds", "alreadyLoaded"} <= set(load["properties"])
    status = resolve(schema, answer("/v1/models/status")["application/json"]["schema"]["$ref"])
    assert set(status["properties"]) == {"loaded", "loading_status", "repository", "repositories", "nodes"}
    assert set(status["properties"]["loading_status"]["additionalProperties"]) == {"$ref"}
    node_status = schema["components"]["schemas"]["PoolNodeStatus"]
    [models] = [s for s in node_status["properties"]["models"]["anyOf"] if s.get("type") == "array"]
    assert {"size_bytes", "loaded_at"} <= set(resolve(schema, models["items"]["$ref"])["properties"])


def test_the_node_load_body_carries_the_jobs_limits(schema: dict[str, Any]) -> None:
    body = schema["components"]["schemas"]["NodeLoadRequest"]
    assert body["required"] == ["modelId"] and body["additionalProperties"] is False
    job = LOAD.job.model_json_schema()["properties"]
    for wire in ("modelPath", "contextLength", "gpuLayers"):
        assert body["properties"][wire]["anyOf"] == job[wire]["anyOf"], wire
    assert job["contextLength"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1 << 20}


def test_the_error_table_is_the_one_source_of_statuses(schema: dict[str, Any]) -> None:
    documented = {
        code
        for _, _, op in operations(schema)
        for response in op["responses"].values()
        for code in _codes(response.get("description", ""))
    }
    for cls, status in STATUS.items():
        assert status_of(cls) == status
    assert {"node_offline", "node_went_offline", "invalid_model_id"} <= documented  # answered as their parents
    assert {cls.code for cls in (e.DuplicateNode, e.LostNodeOwnership, e.RedisRefused)}.isdisjoint(documented)
    assert {op.value for op in Operation} == {"load", "unload", "unload_all", "list", "catalog"}


def _codes(description: str) -> list[str]:
    return [part.split("`")[0] for part in description.split("- `")[1:]]


def test_docs_and_redoc_are_served_without_a_cdn(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200 and "/openapi.json" in response.text
        assert "cdn" not in response.text.lower() and "https://" not in response.text, page
        for asset in _assets(response.text):
            fetched = client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    assert "persistAuthorization" in client.get("/docs").text


def _assets(html: str) -> list[str]:
    found = []
    for marker in ('src="', 'href="'):
        for chunk in html.split(marker)[1:]:
            url = chunk.split('"', 1)[0]
            if url.startswith("/docs/assets/"):
                found.append(url)
    assert found, html
    return found
