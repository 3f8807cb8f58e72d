"""A node's OpenAI-compatible inference endpoint, with real worker processes, real Redis and real HTTP.

One worker serves the module: the real stories260K model, a copy of it with a chat template in its GGUF
header, and "slow" (`write_endless_model`), for the tests that need a generation still running: disconnect,
full queue, unload during a stream.
"""

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import keys
from broker.events import ModelEvent, parse_event
from tests.conftest import (
    NODE_TOKEN,
    OPERATOR_KEY,
    READ_KEY,
    Api,
    Fleet,
    Worker,
    require_stories,
    wait_for,
)
from workers.gguf_factory import write_endless_model, write_with_chat_template

pytestmark = pytest.mark.slow

LILY = ", there was a little girl named Lily"
# The chat template writes the last message as a bare prompt, so the real model continues it as it would a
# completion: the answer is known. It also shows the template's own variables (bos_token) at work.
TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
# A template that runs 10^10 empty steps before it writes anything: for as long as it loops, the model is busy.
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def api(module_fleet: Fleet) -> Api:
    return module_fleet.api()


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, api: Api, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    stories = require_stories()
    models = tmp_path_factory.mktemp("inference-models")
    (models / "stories260K.gguf").write_bytes(stories.read_bytes())
    write_with_chat_template(stories, models / "chatty.gguf", TEMPLATE)
    write_with_chat_template(stories, models / "loopy.gguf", LOOP + TEMPLATE)
    write_endless_model(models / "slow.gguf")
    worker = module_fleet.worker(
        "infer", models, "--preload", "stories260K,chatty", "--max-queue", "1", "--threads", "1", "--keep-alive", "3600"
    )
    with worker.inference() as client:
        wait_for(lambda: {"stories260K", "chatty"} <= loaded(client), 60, "the preloaded models")
    with api.client() as operator:
        response = operator.post(
            f"/api/v1/nodes/{worker.fingerprint}/models/load", json={"modelId": "slow", "contextLength": 2048}
        )
        assert response.status_code == 200, response.text
    return worker


def loaded(client: httpx.Client) -> set[str]:
    return {m["id"] for m in models(client) if m["state"] == "loaded"}


def models(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return body["data"]  # type: ignore[no-any-return]


def model(client: httpx.Client, model_id: str) -> dict[str, Any]:
    return next(m for m in models(client) if m["id"] == model_id)


def sse(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    """The `data:` payloads of an event stream: parsed JSON, or the string "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def test_completion_continues_the_story(node: Worker) -> None:
    with node.inference() as client:
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "text_completion" and answer["model"] == "stories260K"
    assert answer["choices"][0]["text"].startswith(LILY)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}  # BOS + 4 words


def test_top_p_zero_is_greedy_and_token_id_prompts_are_400(node: Worker) -> None:
    with node.inference() as client:
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.5, "top_p": 0}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"].startswith(LILY)
        for prompt in ([1, 2, 3], [[1, 2, 3]]):
            refused = client.post("/v1/completions", json=body | {"prompt": prompt})
            assert refused.status_code == 400 and "token-id" in refused.json()["error"]["message"], refused.text


def test_streamed_completion_with_usage_and_stop(node: Worker) -> None:
    body = {
        "model": "stories260K",
        "prompt": "Once upon a time",
        "max_tokens": 50,
        "temperature": 0,
        "stop": [" named"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with node.inference() as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse(response))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert all(c["object"] == "text_completion" for c in chunks) and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == ", there was a little girl"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 5


def streamed_text(client: httpx.Client, tokens: int) -> tuple[list[str], int]:
    """A greedy streamed story of `tokens` tokens: the text of each event, and the tokens its usage counts."""
    body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        chunks = [e for e in sse(response) if isinstance(e, dict)]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["text"]]
    return texts, chunks[-1]["usage"]["completion_tokens"]


def test_tokens_faster_than_the_stream_interval_go_out_together(module_fleet: Fleet, node: Worker) -> None:
    """By default a stream writes at most every 10 ms after its first token, each write one event with what
    was generated since: stories260K makes thousands of tokens a second, so 200 of them take far fewer
    events, and their text is the unstreamed answer's. `--stream-interval 0` sends one event per token."""
    with node.inference() as client:
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        batched, tokens = streamed_text(client, 200)
    assert tokens == 200 and "".join(batched) == whole
    assert len(batched) < tokens / 2, len(batched)
    worker = module_fleet.worker(
        "every-token", node.models_dir, "--preload", "stories260K", "--threads", "1", "--stream-interval", "0"
    )
    with worker.inference() as client:
        wait_for(lambda: "stories260K" in loaded(client), 60, "the preloaded model")
        each, tokens = streamed_text(client, 200)
    assert "".join(each) == whole
    assert len(each) == tokens == 200


def test_a_stream_without_usage_ends_with_its_token_count_as_a_comment(node: Worker) -> None:
    """Events carry several tokens each, so the head counts a stream's tokens (its tokens per second) from a
    closing SSE comment, which clients skip; a caller that asked for usage gets the usage chunk instead."""
    body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 50, "temperature": 0, "stream": True}
    with node.inference() as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = list(response.iter_lines())
        with client.stream("POST", "/v1/completions", json=body | {"stream_options": {"include_usage": True}}) as r:
            with_usage = list(r.iter_lines())
    comments = [line for line in lines if line.startswith(":")]
    assert comments == [': {"completion_tokens":50}'], lines[-6:]
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert not [line for line in with_usage if line.startswith(":")]


def test_chat_through_the_models_own_template(node: Worker) -> None:
    body: dict[str, Any] = {
        "model": "chatty",
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    with node.inference() as client:
        whole = client.post("/v1/chat/completions", json=body)
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
            assert response.status_code == 200
            events = list(sse(response))
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": answer["choices"][0]["message"]["content"],
    }
    assert answer["choices"][0]["message"]["content"].startswith(LILY)
    assert answer["usage"]["prompt_tokens"] == 5  # the template's bos_token is not tokenized twice
    chunks = [e for e in events if isinstance(e, dict)]
    assert events[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == answer["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_model_without_template_answers_through_the_plain_one(node: Worker) -> None:
    body = {"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    with node.inference() as client:
        response = client.post("/v1/chat/completions", json=body | {"seed": 7, "temperature": 0.9})
        again = client.post("/v1/chat/completions", json=body | {"seed": 7, "temperature": 0.9})
    assert response.status_code == 200, response.text
    # "User: Hi\nAssistant:" is 1 BOS plus the tokens of that text: more than the 3 of "Hi" alone.
    assert response.json()["usage"]["prompt_tokens"] > 3
    assert response.json()["choices"][0]["message"] == again.json()["choices"][0]["message"]  # same seed


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("wrong-key", 401), (READ_KEY, 200), (OPERATOR_KEY, 200), (NODE_TOKEN, 200)]
)
def test_every_call_needs_a_fleet_key_or_the_node_token(node: Worker, key: str | None, status: int) -> None:
    with node.inference(key=key) as client:
        response = client.get("/v1/models")
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_loaded", ["nope", "not loaded"]),
        ({"model": "stories260K", "prompt": "x", "n": 2}, 400, "invalid_request", ["n=2"]),
        (
            {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 510},
            400,
            "context_length_exceeded",
            ["(5 tokens)", "(510)", "512"],
        ),
        ({"model": "stories260K", "prompt": "x", "temperature": 3}, 422, "invalid_request", ["temperature"]),
        ({"model": "stories260K"}, 422, "invalid_request", ["prompt"]),
    ],
)
def test_errors_have_openais_shape(
    node: Worker, body: dict[str, Any], status: int, code: str, words: list[str]
) -> None:
    with node.inference() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert all(w in error["message"] for w in words), error["message"]
    if status == 422:  # the first field named, as the head names it
        assert error["param"] == words[0], error


def test_the_node_lists_its_endpoint_and_use_per_model(node: Worker, api: Api) -> None:
    with node.inference() as client:
        client.post("/v1/completions", json={"model": "stories260K", "prompt": "Once", "max_tokens": 3})
        card = model(client, "stories260K")
    assert card["object"] == "model" and card["owned_by"] == "modelfleet" and card["created"] > 0
    assert card["endpoint"] == node.endpoint and card["healthy"] is True
    assert card["tokensGenerated"] >= 3 and card["lastUsed"] and card["inFlight"] == 0 and card["queued"] == 0
    assert card["keepAlive"] == 3600  # the node's --keep-alive
    with api.client() as operator:
        listed = operator.get(f"/api/v1/nodes/{node.fingerprint}/models").json()
        info = operator.get(f"/api/v1/nodes/{node.fingerprint}").json()
    entry = next(m for m in listed["data"] if m["id"] == "stories260K")
    assert entry["endpoint"] == node.endpoint and entry["tokensGenerated"] >= 3
    assert info["endpoint"] == node.endpoint


def slow_stream(client: httpx.Client, max_tokens: int = 1500) -> Any:
    body = {"model": "slow", "prompt": "Go", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return client.stream("POST", "/v1/completions", json=body)


def test_a_client_that_disconnects_frees_the_model_at_once(node: Worker) -> None:
    with node.inference() as client:
        with slow_stream(client) as response:
            assert response.status_code == 200
            events = sse(response)  # kept: a dropped iterator would close the response (a disconnect)
            first = next(events)
            assert isinstance(first, dict) and model(client, "slow")["inFlight"] == 1
        # 1500 tokens take well over ten seconds; the slot is free long before that.
        wait_for(lambda: model(client, "slow")["inFlight"] == 0, 10, "the generation to stop")
        tokens = model(client, "slow")["tokensGenerated"]
        response2 = client.post("/v1/completions", json={"model": "slow", "prompt": "Go", "max_tokens": 1})
        assert response2.status_code == 200
        assert model(client, "slow")["tokensGenerated"] == tokens + 1  # the abandoned one stopped for good


def test_a_template_that_never_ends_is_stopped_and_frees_its_model(node: Worker, api: Api) -> None:
    with api.client() as operator:
        response = operator.post(f"/api/v1/nodes/{node.fingerprint}/models/load", json={"modelId": "loopy"})
        assert response.status_code == 200, response.text
    chat = {"model": "loopy", "messages": [{"role": "user", "content": "Once upon a time"}], "temperature": 0}
    with node.inference() as client:
        wait_for(lambda: model(client, "loopy")["healthy"], 30, "loopy's health check")
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "chat_template_error"
        assert "did not finish within" in response.json()["error"]["message"]
        assert model(client, "loopy")["inFlight"] == 0
        body = {"model": "loopy", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"].startswith(LILY)
        # A caller that leaves while the template still renders frees the model as soon as the watchdog looks.
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=chat, timeout=0.5)
        wait_for(lambda: model(client, "loopy")["inFlight"] == 0, 1.0, "the render to stop")
    with api.client() as operator:
        response = operator.post(f"/api/v1/nodes/{node.fingerprint}/models/unload", json={"modelId": "loopy"})
        assert response.status_code == 200, response.text


def test_a_prompt_with_a_nul_character_is_refused_by_the_ctransformers_backend(node: Worker) -> None:
    with node.inference() as client:
        completion = {"model": "stories260K", "prompt": "Once\u0000 upon a time", "max_tokens": 3}
        chat = {"model": "chatty", "messages": [{"role": "user", "content": "Once\u0000 upon a time"}]}
        for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
            response = client.post(path, json=body)
            assert response.status_code == 400, response.text
            assert "NUL character" in response.json()["error"]["message"]


def test_a_model_whose_file_is_written_over_is_unloaded_and_the_node_lives(node: Worker, api: Api) -> None:
    """`cp` over a loaded model's file rewrites it in place, under the model's mapped weights: the next read of
    a page past the new end (a prompt, or the health check) killed the worker with SIGBUS, and every model with
    it."""
    doomed = node.models_dir / "doomed.gguf"
    doomed.write_bytes(require_stories().read_bytes())
    with api.client() as operator:
        response = operator.post(f"/api/v1/nodes/{node.fingerprint}/models/load", json={"modelId": "doomed"})
        assert response.status_code == 200, response.text
    body = {"model": "doomed", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    with node.inference() as client:
        wait_for(lambda: model(client, "doomed")["healthy"], 30, "doomed's health check")
        with open(doomed, "wb") as file:  # what cp does: the same inode, truncated, then written
            file.write(b"GGUF")
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 404, response.text
        assert "written over on disk" in response.json()["error"]["message"]
        wait_for(lambda: "doomed" not in {m["id"] for m in models(client)}, 10, "the model to be unloaded")
        still = client.post("/v1/completions", json=body | {"model": "stories260K", "max_tokens": 5})
        assert still.status_code == 200, still.text
    assert node.alive(), "the worker died"
    doomed.unlink()


def test_a_full_queue_answers_429_with_retry_after(node: Worker) -> None:
    outcome: dict[str, int] = {}

    def queued_request() -> None:
        with node.inference() as other:
            outcome["status"] = other.post(
                "/v1/completions", json={"model": "slow", "prompt": "Go", "max_tokens": 1}
            ).status_code

    with node.inference() as client:
        with slow_stream(client) as response:
            events = sse(response)
            next(events)
            waiting = threading.Thread(target=queued_request)
            waiting.start()
            wait_for(lambda: model(client, "slow")["queued"] == 1, 10, "a queued request")
            busy = client.post("/v1/completions", json={"model": "slow", "prompt": "Go", "max_tokens": 1})
            assert busy.status_code == 429
            assert int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "model_busy"
        waiting.join(20)  # the stream's client left: the queued request runs
    assert outcome == {"status": 200}


def test_unload_during_a_stream_waits_then_stops_it_cleanly(module_fleet: Fleet, node: Worker) -> None:
    api = module_fleet.api(MODELFLEET_UNLOAD_TIMEOUT="4")
    with api.client() as operator:
        loaded_doomed = operator.post(
            f"/api/v1/nodes/{node.fingerprint}/models/load",
            json={"modelId": "doomed", "modelPath": "slow.gguf", "contextLength": 2048},
        )
        assert loaded_doomed.status_code == 200, loaded_doomed.text
    unloaded: dict[str, httpx.Response] = {}

    def unload() -> None:
        with api.client() as operator:
            unloaded["response"] = operator.post(
                f"/api/v1/nodes/{node.fingerprint}/models/unload", json={"modelId": "doomed"}
            )

    with node.inference() as client:
        body = {"model": "doomed", "prompt": "Go", "max_tokens": 2000, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = sse(response)
            next(events)
            unloader = threading.Thread(target=unload)
            unloader.start()
            wait_for(lambda: model(client, "doomed")["state"] == "unloading", 10, "the unload to begin")
            refused = client.post("/v1/completions", json={"model": "doomed", "prompt": "Go", "max_tokens": 1})
            assert refused.status_code == 404 and "being unloaded" in refused.json()["error"]["message"]
            rest = list(events)  # the generation went on until the deadline, then was stopped
        unloader.join(30)
        assert "doomed" not in {m["id"] for m in models(client)}
    assert unloaded["response"].status_code == 200, unloaded["response"].text
    assert rest[-1] == "[DONE]" and isinstance(rest[-2], dict)
    assert rest[-2]["error"]["code"] == "model_not_loaded" and "unloaded" in rest[-2]["error"]["message"]
    assert sum(1 for e in rest if isinstance(e, dict) and "choices" in e) > 10
    assert node.alive() and "Traceback" not in node.log()


def test_an_idle_model_unloads_itself_after_its_keep_alive(module_fleet: Fleet, node: Worker, api: Api) -> None:
    with api.client() as operator:
        response = operator.post(
            f"/api/v1/nodes/{node.fingerprint}/models/load",
            json={"modelId": "brief", "modelPath": "stories260K.gguf", "keepAlive": 1},
        )
        assert response.status_code == 200, response.text

    def unload_events() -> list[tuple[str, str | None]]:
        stream = module_fleet.redis.client().xrange(keys.events_stream())
        events = [parse_event(fields[b"event"]) for _, fields in stream if b"event" in fields]
        mine = [e for e in events if isinstance(e, ModelEvent) and e.model_id == "brief"]
        return [(e.type, e.reason) for e in mine if e.type in ("model-loaded", "model-unloading", "model-unloaded")]

    wait_for(lambda: len(unload_events()) == 3, 30, "the model to load, then unload when idle")
    assert unload_events() == [("model-loaded", None), ("model-unloading", "idle"), ("model-unloaded", "idle")]
    with node.inference() as client:
        assert "brief" not in loaded(client) and {"stories260K", "chatty"} <= loaded(client)  # 3600 s each


def test_a_node_without_keys_serves_no_endpoint(module_fleet: Fleet, node: Worker, tmp_path: Path) -> None:
    worker = module_fleet.worker(
        "keyless", node.models_dir, MODELFLEET_API_KEYS="", MODELFLEET_OPERATOR_KEYS="", MODELFLEET_NODE_TOKEN=""
    )
    with pytest.raises(AssertionError, match="no inference endpoint"):
        _ = worker.endpoint
    assert "serves no inference endpoint" in worker.log()


def test_a_stopping_node_ends_its_streams_with_an_error_event_at_once(module_fleet: Fleet, node: Worker) -> None:
    """SIGTERM while a stream ran: the stream went on until the HTTP server's grace (3 s) ran out, then was cut
    without an error event, and the node logged a CancelledError for it."""
    worker = module_fleet.worker("stopping", node.models_dir, "--preload", "slow", "--threads", "1")
    with worker.inference() as client:
        wait_for(lambda: "slow" in loaded(client), 60, "the preloaded model")
        with slow_stream(client, max_tokens=400) as response:  # its preload's context: 512 tokens
            assert response.status_code == 200, response.read()
            events = sse(response)
            assert isinstance(next(events), dict)
            worker.signal(signal.SIGTERM)
            stopped = time.monotonic()
            rest = list(events)
    assert time.monotonic() - stopped < 2.5, "the stream ran on until the grace ran out"
    assert rest[-1] == "[DONE]" and isinstance(rest[-2], dict), rest[-3:]
    assert rest[-2]["error"]["code"] == "shutting_down"
    worker.wait(30)
    assert "Exception in ASGI application" not in worker.log() and "CancelledError" not in worker.log()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_by_the_node_and_the_head_which_go_on_serving(
    node: Worker, api: Api, declared: bool
) -> None:
    # The default limit, 16 MiB (tests/api/test_body_limit.py tries the edges with a small one).
    huge = b'{"model": "stories260K", "prompt": "' + b"x" * (17 * 2**20) + b'"}'
    headers = {"content-type": "application/json"}
    with node.inference() as direct, api.client(READ_KEY) as head:
        for client in (direct, head):
            body = huge if declared else (huge[at : at + 2**20] for at in range(0, len(huge), 2**20))
            response = client.post("/v1/completions", content=body, headers=headers)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "request_too_large"
            after = client.post("/v1/completions", json={"model": "stories260K", "prompt": "Once upon a time"})
            assert after.status_code == 200, after.text
