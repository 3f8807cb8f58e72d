"""A request body over `max_body_bytes` is refused with 413 `request_too_large` as it arrives, in the shape the
route's clients read, by the head (with its fast lane, `api.fastlane`, and without) and by a node, whether the
client declared its length or streamed it in chunks; a body within the limit goes on to the route. The apps run in
this process (the head against a real redis-server); tests/e2e/test_inference_node.py sends an oversized body to
real processes with the default limit.
"""

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from broker.auth import KeyRing
from broker.body_limit import BodyLimit
from broker.errors import RequestTooLarge
from broker.wrong_keys import WrongKeys
from tests.conftest import OPERATOR_KEY, READ_KEY, RedisServer
from workers.backend import CTransformersLoader
from workers.inference.server import create_node_app
from workers.manager import ModelManager

pytestmark = pytest.mark.timeout(60)

LIMIT = 4096


@pytest.fixture(scope="module", params=[True, False], ids=["lane", "no-lane"])
def head(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    settings = ApiSettings(
        redis_url=redis_server.url,
        operator_keys=OPERATOR_KEY,
        api_keys=READ_KEY,
        max_body_bytes=LIMIT,
        load_on_demand=False,
    )
    with TestClient(
        create_app(settings, fast_lane=request.param), headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
    ) as client:
        yield client


@pytest.fixture(scope="module")
def node() -> Iterator[TestClient]:
    app = create_node_app(
        ModelManager(CTransformersLoader(threads=1)),
        KeyRing([SecretStr(OPERATOR_KEY)], []),
        wrong_keys=WrongKeys(20, 60),
        max_body_bytes=LIMIT,
    )
    with TestClient(app, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}) as client:
        yield client


def prompt(size: int) -> bytes:
    """A completion request of exactly `size` bytes."""
    head, tail = b'{"model": "stories260K", "prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """`body` sent as it is read, without a Content-Length (chunked)."""
    for at in range(0, len(body), size):
        yield body[at : at + size]


MESSAGE = f"The request body is over this server's limit of {LIMIT} bytes (MODELFLEET_MAX_BODY_BYTES)."


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_the_heads_own_routes_refuse_a_body_over_the_limit_in_their_shape(head: TestClient, streamed: bool) -> None:
    body = b'{"model_name": "' + b"m" * LIMIT + b'"}'
    response = head.post(
        "/v1/models/load", content=chunks(body) if streamed else body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert response.json() == {
        "success": False,
        "error": MESSAGE,
        "code": "request_too_large",
        "details": {"limit_bytes": LIMIT},
    }


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_inference_refuses_a_body_over_the_limit_in_openais_shape(head: TestClient, path: str, streamed: bool) -> None:
    body = prompt(LIMIT + 1)
    response = head.post(path, content=chunks(body) if streamed else body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": {"message": MESSAGE, "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    }


def test_a_body_at_the_limit_reaches_the_route(head: TestClient) -> None:
    # Read and validated: it names a model no node holds (none is up), so the route's own 404 answers.
    response = head.post("/v1/completions", content=prompt(LIMIT), headers={"content-type": "application/json"})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_loaded"


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_a_node_refuses_a_body_over_the_limit_in_openais_shape(node: TestClient, streamed: bool) -> None:
    body = prompt(LIMIT + 1)
    response = node.post(
        "/v1/completions", content=chunks(body) if streamed else body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": {"message": MESSAGE, "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    }
    at_limit = node.post("/v1/completions", content=prompt(LIMIT), headers={"content-type": "application/json"})
    assert at_limit.status_code == 404, at_limit.text  # read, validated: the model is not loaded here


def test_the_schema_says_which_routes_answer_413(head: TestClient) -> None:
    paths: dict[str, Any] = head.get("/openapi.json").json()["paths"]
    with_body = {(path, method) for path, ops in paths.items() for method, op in ops.items() if "requestBody" in op}
    assert {("/v1/models/load", "post"), ("/v1/completions", "post"), ("/api/v1/session", "post")} <= with_body
    for path, ops in paths.items():
        for method, op in ops.items():
            assert ("413" in op["responses"]) == ((path, method) in with_body), (path, method)
            if (path, method) in with_body:
                assert op["responses"]["413"]["content"] == op["responses"]["500"]["content"], (path, method)


def test_a_request_without_a_body_method_is_served_whatever_it_sends(head: TestClient) -> None:
    # No route of a GET reads its body; an event stream listens for the client leaving, which must not fail.
    response = head.request("GET", "/api/v1/nodes", content=b"x" * (LIMIT * 2))
    assert response.status_code == 200 and isinstance(response.json()["data"], list), response.text


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_the_limit_leaves_the_receive_of_bodyless_methods_alone(method: str) -> None:
    """Straight on the middleware: a GET whose route listens for a disconnect gets every message as it came."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x" * (LIMIT + 1), "more_body": False}

    scope = {"type": "http", "method": method, "headers": [(b"content-length", str(LIMIT + 1).encode())]}
    asyncio.run(BodyLimit(app, LIMIT)(scope, receive, None))  # type: ignore[arg-type]
    assert seen == [{"type": "http.request", "body": b"x" * (LIMIT + 1), "more_body": False}]
    scope["method"] = "POST"
    with pytest.raises(RequestTooLarge):
        asyncio.run(BodyLimit(app, LIMIT)(scope, receive, None))  # type: ignore[arg-type]
