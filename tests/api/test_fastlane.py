"""`api.fastlane` answers `GET /api/v1/nodes/{fp}/models` and the two inference routes beneath FastAPI: every
request it takes must get the answer FastAPI's route gives. Two heads, one with the lane and one without, run in
this process against a real redis-server and real worker processes (one serving the real stories260K), and are
asked the same requests: success, every way auth fails (key, session, CSRF-free read, a signed-in prompt without
its CSRF token), a node unknown, offline or named oddly, a bug in the job, prompts streamed or not, bodies that
are not JSON or not the schema, and what the lane passes on. The e2e tests ask the lane over real HTTP
(test_node_api, test_contract, test_inference)."""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from api import fastlane
from api.app import create_app
from api.jobs import JobClient
from api.settings import ApiSettings
from broker.auth import Scope
from tests.conftest import (
    NODE_TOKEN,
    OPERATOR_KEY,
    READ_KEY,
    Fleet,
    Worker,
    register_gone_node,
    require_stories,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker("lane-node", models_dir, "--no-serve")


@pytest.fixture(scope="module")
def server(module_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """A node serving the real stories260K, for the inference routes."""
    models = tmp_path_factory.mktemp("lane-stories")
    (models / "stories260K.gguf").write_bytes(require_stories().read_bytes())
    return module_fleet.worker("lane-server", models, "--preload", "stories260K", "--threads", "1")


@pytest.fixture(scope="module")
def heads(module_fleet: Fleet, node: Worker) -> Iterator[tuple[TestClient, TestClient]]:
    """(with the lane, without it), each with its lifespan run: its own Redis clients, reply waiter, directory."""
    settings = ApiSettings(
        redis_url=module_fleet.redis.url, operator_keys=OPERATOR_KEY, api_keys=READ_KEY, node_token=NODE_TOKEN
    )
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as lane,
        TestClient(create_app(settings, fast_lane=False), raise_server_exceptions=False) as plain,
    ):
        yield lane, plain


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the lane took (it authorizes every request it takes; FastAPI's route authorizes through
    `api.deps`, not through the lane's name for it)."""
    paths: list[str] = []
    authorize = fastlane.authorize

    async def counting(request: Request, needed: Scope) -> Scope:
        paths.append(request.url.path)
        return await authorize(request, needed)

    monkeypatch.setattr(fastlane, "authorize", counting)
    return paths


def answer(response: httpx.Response) -> dict[str, Any]:
    """Status, headers and body, less what differs between any two answers: the date, a completion's id and
    creation time (in a JSON answer, and in each event of a stream)."""
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}
    try:
        body: Any = response.json()
    except ValueError:
        body = re.sub(r'"id":"(chat)?cmpl-[0-9a-f]+","object":"([a-z._]+)","created":\d+', r'"\2"', response.text)
    if isinstance(body, dict) and "object" in body:
        body = {k: v for k, v in body.items() if k not in ("id", "created")}
    return {"status": response.status_code, "headers": headers, "body": body}


def both(
    heads: tuple[TestClient, TestClient], taken: list[str], path: str, *, by_lane: bool = True, **request: Any
) -> dict[str, Any]:
    """The answer both heads gave (they must agree), the first through its lane if `by_lane`, else not."""
    method = request.pop("method", "GET")
    before = len(taken)
    lane = answer(heads[0].request(method, path, **request))
    assert len(taken) == before + by_lane
    plain = answer(heads[1].request(method, path, **request))
    assert len(taken) == before + by_lane
    assert lane == plain
    return lane


def models(node: Worker) -> str:
    return f"/api/v1/nodes/{node.fingerprint}/models"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_list_is_the_same_answer(heads: tuple[TestClient, TestClient], taken: list[str], node: Worker) -> None:
    lane, _ = heads
    loaded = lane.post(models(node) + "/load", json={"modelId": "tiny-a"}, headers=bearer(OPERATOR_KEY))
    assert loaded.status_code == 200, loaded.text
    try:
        for key in (OPERATOR_KEY, READ_KEY):
            got = both(heads, taken, models(node), headers=bearer(key))
            assert got["status"] == 200 and got["headers"]["content-type"] == "application/json"
            [model] = got["body"]["data"]
            assert model["id"] == "tiny-a" and model["state"] == "loaded" and model["loadedAt"]
    finally:
        lane.post(models(node) + "/unload-all", headers=bearer(OPERATOR_KEY))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthenticated"),
        (bearer("not-a-key"), 401, "unauthenticated"),
        ({"Authorization": "Basic b3A6a2V5"}, 401, "unauthenticated"),
        ({"Authorization": "Bearer"}, 401, "unauthenticated"),
        ({"Cookie": "modelfleet_session=gone"}, 401, "unauthenticated"),
    ],
)
def test_refused_keys_are_the_same_answer(
    heads: tuple[TestClient, TestClient],
    taken: list[str],
    node: Worker,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got = both(heads, taken, models(node), headers=headers)
    assert (got["status"], got["body"]["code"]) == (status, code)
    assert got["body"]["success"] is False and got["body"]["error"]


def test_a_session_reads_the_same(heads: tuple[TestClient, TestClient], taken: list[str], node: Worker) -> None:
    for head in heads:
        signed_in = head.post("/api/v1/session", json={"key": READ_KEY})
        assert signed_in.status_code == 200, signed_in.text
    got = both(heads, taken, models(node))  # each client sends its own cookie, no CSRF token: a read needs none
    assert got["status"] == 200 and got["body"] == {"data": []}
    for head in heads:
        head.cookies.clear()


@pytest.mark.parametrize(
    ("fingerprint", "by_lane"),
    [
        ("0" * 64, True),
        ("no-such-node", True),
        ("%20spaced", True),
        ("caf%C3%A9", True),
        ("..", False),  # the client resolves it: GET /api/v1/models
        ("a%2Fb", False),  # decoded, two segments: no route (Starlette matches the decoded path too)
    ],
)
def test_unknown_nodes_are_the_same_answer(
    heads: tuple[TestClient, TestClient], taken: list[str], fingerprint: str, by_lane: bool
) -> None:
    got = both(heads, taken, f"/api/v1/nodes/{fingerprint}/models", by_lane=by_lane, headers=bearer(READ_KEY))
    assert got["status"] == 404 and got["body"]["success"] is False


def test_an_offline_node_is_the_same_answer(
    heads: tuple[TestClient, TestClient], taken: list[str], module_fleet: Fleet
) -> None:
    gone = register_gone_node(module_fleet)
    got = both(heads, taken, f"/api/v1/nodes/{gone.fingerprint}/models", headers=bearer(READ_KEY))
    assert got["status"] == 503 and got["body"]["code"] == "node_offline"
    assert got["body"]["details"]["node"] == gone.fingerprint


def test_a_bug_in_the_job_is_the_same_internal_error(
    heads: tuple[TestClient, TestClient], taken: list[str], node: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(JobClient, "run", broken)
    answers = [answer(head.get(models(node), headers=bearer(READ_KEY))) for head in heads]
    assert taken == [models(node)]
    for got in answers:  # each with its own log reference
        assert got["status"] == 500 and got["body"]["code"] == "internal_error"
        assert "a bug" not in got["body"]["error"] and "reference" in got["body"]["error"]
    assert [{**a, "body": {**a["body"], "error": ""}} for a in answers] == [
        {**answers[1], "body": {**answers[1]["body"], "error": ""}}
    ] * 2


@pytest.mark.parametrize(
    ("method", "suffix"), [("HEAD", ""), ("POST", ""), ("DELETE", ""), ("GET", "/"), ("GET", "?limit=1")]
)
def test_other_methods_a_trailing_slash_and_a_query_are_the_same_answer(
    heads: tuple[TestClient, TestClient], taken: list[str], node: Worker, method: str, suffix: str
) -> None:
    by_lane = method == "GET" and suffix != "/"
    got = both(
        heads,
        taken,
        models(node) + suffix,
        by_lane=by_lane,
        method=method,
        headers=bearer(READ_KEY),
        follow_redirects=False,
    )
    assert got["status"] == {"HEAD": 405, "POST": 405, "DELETE": 405}.get(method, 307 if suffix == "/" else 200)


STORY = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
CHAT = {"model": "stories260K", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def serving(heads: tuple[TestClient, TestClient], server: Worker) -> None:
    def listed(head: TestClient) -> bool:
        entries = head.get("/v1/models", headers=bearer(READ_KEY)).json()["data"]
        return any(e["id"] == "stories260K" and e["loaded_on"] for e in entries)

    wait_for(lambda: all(listed(head) for head in heads), 60, "stories260K on both heads")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", STORY),
        ("/v1/completions", {**STORY, "stream": True}),
        ("/v1/completions", {**STORY, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {**CHAT, "temperature": 0}),
        ("/v1/chat/completions", {**CHAT, "temperature": 0, "stream": True}),
    ],
    ids=["completion", "stream", "stream-usage", "chat", "chat-stream"],
)
@pytest.mark.parametrize("key", [READ_KEY, OPERATOR_KEY], ids=["read-key", "operator-key"])
def test_a_prompt_is_the_same_answer(
    heads: tuple[TestClient, TestClient], taken: list[str], serving: None, path: str, body: Any, key: str
) -> None:
    got = both(heads, taken, path, method="POST", json=body, headers=bearer(key))
    assert got["status"] == 200, got
    assert got["headers"]["content-type"].startswith("text/event-stream" if body.get("stream") else "application/json")
    if path == "/v1/completions":  # a chat through the plain template says something else
        assert "there was a little girl" in (got["body"] if body.get("stream") else json.dumps(got["body"]))


@pytest.mark.parametrize(
    ("content", "headers", "by_lane", "status"),
    [
        (b"{not json", {}, False, 422),
        (b"", {}, False, 422),
        (b'["a list"]', {}, False, 422),
        (b"[" * 5000 + b"]" * 5000, {}, False, 422),  # deeper than json.loads can go (RecursionError)
        (json.dumps({**STORY, "max_tokens": "many"}).encode(), {}, False, 422),
        (json.dumps({**STORY, "prompt": None}).encode(), {}, False, 422),
        (json.dumps(STORY).encode(), {"content-type": "text/plain"}, False, 422),
        (json.dumps(STORY).encode(), {"content-type": "application/json; charset=utf-8"}, True, 200),
        (json.dumps({**STORY, "n": 2}).encode(), {}, True, 400),
        (json.dumps({**STORY, "model": "no-such-model"}).encode(), {}, True, 404),
        (json.dumps(STORY).encode(), {"Authorization": "Bearer not-a-key"}, True, 401),
        (json.dumps(STORY).encode(), {"Authorization": ""}, True, 401),
    ],
    ids=[
        "not-json",
        "empty",
        "not-an-object",
        "too-deep",
        "wrong-type",
        "null-prompt",
        "text-plain",
        "charset",
        "unsupported",
        "unknown-model",
        "wrong-key",
        "no-key",
    ],
)
def test_a_refused_or_odd_prompt_is_the_same_answer(
    heads: tuple[TestClient, TestClient],
    taken: list[str],
    serving: None,
    content: bytes,
    headers: dict[str, str],
    by_lane: bool,
    status: int,
) -> None:
    sent = {"content-type": "application/json", **bearer(READ_KEY), **headers}
    if not sent["Authorization"]:
        del sent["Authorization"]
    got = both(heads, taken, "/v1/completions", by_lane=by_lane, method="POST", content=content, headers=sent)
    assert got["status"] == status, got
    if status != 200:
        assert set(got["body"]["error"]) == {"message", "type", "param", "code"}, got


def test_a_signed_in_prompt_needs_its_csrf_token_the_same(
    heads: tuple[TestClient, TestClient], taken: list[str], serving: None
) -> None:
    tokens = []
    for head in heads:
        signed_in = head.post("/api/v1/session", json={"key": READ_KEY})
        assert signed_in.status_code == 200, signed_in.text
        tokens.append(signed_in.json()["csrfToken"])
    try:
        got = both(heads, taken, "/v1/completions", method="POST", json=STORY)
        assert got["status"] == 403 and got["body"]["error"]["code"] == "forbidden", got
        answers = [
            answer(head.post("/v1/completions", json=STORY, headers={"X-CSRF-Token": token}))
            for head, token in zip(heads, tokens, strict=True)
        ]
        assert answers[0] == answers[1] and answers[0]["status"] == 200, answers
    finally:
        for head in heads:
            head.cookies.clear()
