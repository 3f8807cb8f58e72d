"""Prompts through the head, end to end: real Redis, real worker processes serving the real stories260K model on
their inference endpoints, real API processes, real HTTP, and openai-python used exactly as its users do."""

import asyncio
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from broker import keys
from tests.conftest import (
    READ_KEY,
    Api,
    Fleet,
    Worker,
    free_port,
    modelfleet_command,
    require_stories,
    wait_for,
)
from workers.gguf_factory import write_endless_model, write_tiny_llama

pytestmark = pytest.mark.slow

STORY = "Once upon a time"
LILY = ", there was a little girl named Lily"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stories")
    shutil.copy(require_stories(), root / "stories260K.gguf")
    (root / "lazy").mkdir()
    shutil.copy(require_stories(), root / "lazy" / "stories.gguf")  # loaded by nobody until a prompt asks for it
    write_endless_model(root / "endless.gguf")
    # Weights enough that its one-token check takes a while after its load has answered (~10 ms a token here).
    write_tiny_llama(root / "heavy.gguf", pad_to_bytes=60_000_000)
    return root


@pytest.fixture(scope="module")
def two(module_fleet: Fleet, stories_dir: Path) -> tuple[Api, Worker, Worker]:
    """One API and two nodes with stories260K loaded on both."""
    queue = ("--max-queue", "64", "--threads", "1")  # one thread: no spinning ggml barrier on shared cores
    a = module_fleet.worker("inf-a", stories_dir, *queue)
    b = module_fleet.worker("inf-b", stories_dir, *queue)
    api = module_fleet.api()
    with api.client() as client:
        for worker in (a, b):
            response = client.post("/v1/models/load", json={"model_name": "stories260K", "node": worker.fingerprint})
            assert response.status_code == 200, response.text
    with api.client(READ_KEY) as client:
        wait_for(lambda: len(_replicas(client, "stories260K")) == 2, 20, "both replicas to be served")
    return api, a, b


def _replicas(client: httpx.Client, model: str) -> list[str]:
    entries = client.get("/v1/models").json()["data"]
    return next((e["loaded_on"] for e in entries if e["id"] == model), [])


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_stories_continue_through_the_head_streamed_and_not(two: tuple[Api, Worker, Worker]) -> None:
    api, _, _ = two
    with api.client(READ_KEY) as client:
        plain = client.post("/v1/completions", json={"model": "stories260K", "prompt": STORY, **GREEDY})
        assert plain.status_code == 200, plain.text
        answer = plain.json()
        assert answer["choices"][0]["text"].startswith(LILY)
        assert answer["usage"]["completion_tokens"] == 12
        assert answer["choices"][0]["finish_reason"] == "length"

        body = {"model": "stories260K", "prompt": STORY, "stream": True, **GREEDY}
        with client.stream("POST", "/v1/completions", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            text = streamed.read().decode()
        assert text.rstrip().endswith("data: [DONE]")
        assert "".join(e["choices"][0]["text"] for e in _events(text)) == answer["choices"][0]["text"]


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b'{"model": "stories260K", "prompt": "Once \\ud83d upon", "max_tokens": 3}'),
        ("/v1/chat/completions", b'{"model": "stories260K", "messages": [{"role": "user", "content": "\\ud83d"}]}'),
    ],
    ids=["completion", "chat"],
)
def test_half_a_surrogate_pair_is_refused_and_no_model_is_counted_broken(
    two: tuple[Api, Worker, Worker], path: str, raw: bytes
) -> None:
    """JSON can spell a lone UTF-16 surrogate, which no tokenizer can encode: a clear 422 at the head and at a
    node, and both replicas stay healthy (the node used to answer 502 generation_failed and mark the model
    unhealthy, and the head retried it on the other replica, marking that one too)."""
    api, a, _ = two
    headers = {"Content-Type": "application/json"}
    with api.client(READ_KEY) as client, a.inference(READ_KEY) as node:
        for answer in (client.post(path, content=raw, headers=headers), node.post(path, content=raw, headers=headers)):
            assert answer.status_code == 422, answer.text
            assert "not valid Unicode text: it holds \\ud83d" in answer.json()["error"]["message"]
        listed = client.get("/v1/models").json()["data"]
        [stories] = [e for e in listed if e["id"] == "stories260K"]
        assert len(stories["loaded_on"]) == 2  # both replicas still served: none was counted broken
        for worker in two[1:]:
            listed = client.get(f"/api/v1/nodes/{worker.fingerprint}/models").json()["data"]
            [model] = [m for m in listed if m["id"] == "stories260K"]
            assert model["healthy"] is True


def test_openai_python_works_unchanged_against_the_head(two: tuple[Api, Worker, Worker]) -> None:
    api, _, _ = two
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=READ_KEY, max_retries=0)
    completion = client.completions.create(model="stories260K", prompt=STORY, **GREEDY)
    assert completion.choices[0].text.startswith(LILY)
    assert completion.usage is not None and completion.usage.completion_tokens == 12

    pieces = [
        c.choices[0].text for c in client.completions.create(model="stories260K", prompt=STORY, stream=True, **GREEDY)
    ]
    assert "".join(pieces) == completion.choices[0].text

    chat = client.chat.completions.create(
        model="stories260K", messages=[{"role": "user", "content": "Tell me a story."}], **GREEDY
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    chat_stream = client.chat.completions.create(
        model="stories260K",
        messages=[{"role": "user", "content": "Tell me a story."}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(chat_stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    listed = {m.id: m for m in client.models.list()}
    assert listed["stories260K"].object == "model" and listed["stories260K"].owned_by == "modelfleet"
    assert listed["stories260K"].created > 0 and listed["lazy/stories"].created == 0

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt=STORY)
    assert missing.value.code == "model_file_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stories260K", prompt=STORY, n=2)
    with pytest.raises(openai.AuthenticationError):  # the pool's listing: the API's error shape
        openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0).models.retrieve("stories260K")
    assert unauthenticated.value.code == "unauthenticated" and "key" in unauthenticated.value.message

    assert client.models.retrieve("stories260K").loaded_on == listed["stories260K"].loaded_on  # type: ignore[attr-defined]
    assert client.models.retrieve("lazy/stories").id == "lazy/stories"
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {READ_KEY}"}) as http:
        slash = http.get("/v1/models/")  # the listing, not a model called ""
        assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/models"), slash.text
    for action in ("load", "unload", "unload-all"):  # model ids to openai-python; the 404 names the POST route
        with pytest.raises(openai.NotFoundError) as route:
            client.models.retrieve(action)
        assert f"POST /v1/models/{action} is the pool's route" in route.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("no-such-model")
    assert unknown.value.code == "model_file_not_found" and "no-such-model" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as elsewhere:  # a route of OpenAI's that the head does not have
        client.embeddings.create(model="stories260K", input="x")
    assert elsewhere.value.body is not None and "message" in elsewhere.value.body  # type: ignore[operator]
    assert "No route answers POST '/v1/embeddings'" in elsewhere.value.message


def test_two_nodes_share_twenty_concurrent_streams(two: tuple[Api, Worker, Worker]) -> None:
    api, a, b = two

    async def run() -> list[tuple[str, str]]:
        headers = {"Authorization": f"Bearer {READ_KEY}"}
        async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=180) as client:

            async def one() -> tuple[str, str]:
                body = {"model": "stories260K", "prompt": STORY, "stream": True, "temperature": 0, "max_tokens": 40}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200, await response.aread()
                    text = (await response.aread()).decode()
                    return response.headers["x-modelfleet-node"], text

            return await asyncio.gather(*(one() for _ in range(20)))

    served = asyncio.run(run())
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in served)
    by_node = [sum(node == w.fingerprint for node, _ in served) for w in (a, b)]
    assert sum(by_node) == 20 and min(by_node) >= 5, by_node
    redis = a.redis.client()  # type: ignore[union-attr]
    assert redis.zcard(keys.inflight(a.fingerprint)) == redis.zcard(keys.inflight(b.fingerprint)) == 0


def test_a_client_that_disconnects_frees_the_slot_at_once(two: tuple[Api, Worker, Worker]) -> None:
    api, a, _ = two
    redis = a.redis.client()  # type: ignore[union-attr]
    with api.client() as operator:
        body = {"modelId": "endless", "contextLength": 2048}
        response = operator.post(f"/api/v1/nodes/{a.fingerprint}/models/load", json=body)
        assert response.status_code == 200, response.text

    def generated(client: httpx.Client) -> tuple[int, int]:
        """The node's tokens generated so far, and its generations running or queued."""
        listed = client.get(f"/api/v1/nodes/{a.fingerprint}/models").json()["data"]
        [model] = [m for m in listed if m["id"] == "endless"]
        return model["tokensGenerated"], model["inFlight"] + model["queued"]

    # 1,500 tokens of a model that never ends its text take well over ten seconds (`write_endless_model`).
    body = {"model": "endless", "prompt": STORY, "stream": True, "max_tokens": 1500, "temperature": 0}
    with api.client(READ_KEY) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["x-modelfleet-node"] == a.fingerprint
            next(response.iter_lines())
        # The client went away: the head releases the lease and closes the node's stream, which stops generating.
        wait_for(lambda: redis.zcard(keys.inflight(a.fingerprint)) == 0, 5, "the head to release the request's lease")
        wait_for(lambda: generated(client)[1] == 0, 5, "the node's generation to stop")
        tokens = generated(client)[0]
    assert 0 < tokens < 1500, tokens  # stopped before the end of the answer
    with api.client() as operator:
        assert operator.post("/v1/models/unload", json={"model_name": "endless"}).status_code == 200


def test_a_node_failing_before_the_first_byte_is_retried_on_the_other(
    module_fleet: Fleet, stories_dir: Path, two: tuple[Api, Worker, Worker]
) -> None:
    api, _, _ = two
    doomed = module_fleet.worker("inf-doomed", stories_dir, "--max-queue", "64", "--threads", "1")
    with api.client() as client:
        assert (
            client.post("/v1/models/load", json={"model_name": "stories260K", "node": doomed.fingerprint}).status_code
            == 200
        )
    with api.client(READ_KEY) as client:
        wait_for(lambda: doomed.fingerprint in _replicas(client, "stories260K"), 20, "the third replica")
        doomed.signal(signal.SIGKILL)  # crashed: still listed online with the model until its heartbeat lapses
        doomed.wait(10)
        served = []
        for _ in range(30):
            response = client.post("/v1/completions", json={"model": "stories260K", "prompt": STORY, **GREEDY})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"].startswith(LILY)
            served.append(response.headers["x-modelfleet-node"])
            if "retrying stories260K on another replica" in api.log():
                break
        assert "retrying stories260K on another replica" in api.log()
        assert doomed.fingerprint not in served


def test_a_node_whose_endpoint_cannot_be_reached_is_left_out_after_one_failure(
    module_fleet: Fleet, stories_dir: Path, two: tuple[Api, Worker, Worker]
) -> None:
    api, a, b = two
    # A wrong --advertise-url: the node beats and answers its jobs, and its models pass their checks (they run in
    # the node), but nothing answers at the address it gave. The head learns that from one failed request.
    lost = module_fleet.worker("inf-misadvertised", stories_dir, "--advertise-url", f"http://127.0.0.1:{free_port()}")
    # Another API process's requests on the good nodes: the idle one is always picked first while it is in.
    redis = module_fleet.redis.client()
    other = {f"other-api:{i}": int(time.time() * 1000) + 600_000 for i in range(3)}
    for worker in (a, b):
        redis.zadd(keys.inflight(worker.fingerprint), other)
    try:
        with api.client() as client:
            load = client.post("/v1/models/load", json={"model_name": "stories260K", "node": lost.fingerprint})
            assert load.status_code == 200, load.text
        with api.client(READ_KEY) as client:
            wait_for(lambda: lost.fingerprint in _replicas(client, "stories260K"), 20, "the third replica")
            served = []
            for _ in range(12):  # well within the 5 s it is left out for
                response = client.post("/v1/completions", json={"model": "stories260K", "prompt": STORY, **GREEDY})
                assert response.status_code == 200, response.text
                served.append(response.headers["x-modelfleet-node"])
        assert lost.fingerprint not in served
        log = api.log()
        where = f"node inf-misadvertised ({lost.fingerprint})"
        assert log.count(f"{where} failed before answering (ConnectError): left out of routing for 5 s") == 1
        # Tried once: the requests after the first failure went straight to the good replicas.
        assert log.count(f"retrying stories260K on another replica: {where} failed before answering") == 1
        with api.client(READ_KEY) as client:
            metrics = client.get("/metrics").text
        assert f'modelfleet_inference_ejections_total{{node="{lost.fingerprint}"}} 1.0' in metrics
    finally:
        for worker in (a, b):
            redis.zrem(keys.inflight(worker.fingerprint), *other)
        lost.stop()


def test_fifty_first_requests_over_two_apis_load_once(module_fleet: Fleet, two: tuple[Api, Worker, Worker]) -> None:
    first, _, _ = two
    second = module_fleet.api()
    redis = module_fleet.redis.client()
    before = redis.xrevrange(keys.events_stream(), count=1)
    after = before[0][0].decode() if before else "0-0"

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {READ_KEY}"}
        async with (
            httpx.AsyncClient(base_url=first.url, headers=headers, timeout=120) as one,
            httpx.AsyncClient(base_url=second.url, headers=headers, timeout=120) as other,
        ):
            body = {"model": "lazy/stories", "prompt": STORY, **GREEDY}
            return await asyncio.gather(*((one, other)[i % 2].post("/v1/completions", json=body) for i in range(50)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200][:3]
    assert all(r.json()["choices"][0]["text"].startswith(LILY) for r in responses)
    loads = [
        event
        for _, fields in redis.xrange(keys.events_stream(), min=f"({after}")
        if (event := json.loads(fields[b"event"]))["type"] == "model-loading" and event["modelId"] == "lazy/stories"
    ]
    assert len(loads) == 1


def test_without_load_on_demand_a_model_loaded_nowhere_is_404(module_fleet: Fleet) -> None:
    api = module_fleet.api(MODELFLEET_LOAD_ON_DEMAND="false")
    with api.client(READ_KEY) as client:
        response = client.post("/v1/completions", json={"model": "tiny-never-loaded", "prompt": STORY})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_loaded"


def test_a_prompt_right_after_a_load_waits_for_the_models_first_check(
    module_fleet: Fleet, two: tuple[Api, Worker, Worker]
) -> None:
    """A load answers before its one-token check; the head routes only to healthy models. A prompt sent the
    moment the load answers waits for the check instead of answering 404, even with load on demand off."""
    _, a, _ = two
    api = module_fleet.api(MODELFLEET_LOAD_ON_DEMAND="false")
    redis = module_fleet.redis.client()
    with api.client() as operator, api.client(READ_KEY) as reader:
        for _ in range(3):
            loaded = operator.post("/v1/models/load", json={"model_name": "heavy", "node": a.fingerprint})
            assert loaded.status_code == 200, loaded.text
            answer = reader.post("/v1/completions", json={"model": "heavy", "prompt": STORY, **GREEDY})
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] >= 1
            unloaded = operator.post("/v1/models/unload", json={"model_name": "heavy"})
            assert unloaded.status_code == 200, unloaded.text
    told = [json.loads(fields[b"event"]) for _, fields in redis.xrange(keys.events_stream())]
    heavy = [e for e in told if e.get("modelId") == "heavy" and e["node"] == a.fingerprint]
    kinds = ["model-loading", "model-loaded", "model-checked", "model-unloading", "model-unloaded"]
    assert [e["type"] for e in heavy] == kinds * 3
    assert [e["model"]["healthy"] for e in heavy if e["type"] == "model-checked"] == [True] * 3


def test_modelfleet_run_streams_the_answer(two: tuple[Api, Worker, Worker], module_fleet: Fleet) -> None:
    api, _, _ = two
    env = module_fleet.env(MODELFLEET_URL=api.url, MODELFLEET_KEY=READ_KEY)
    argv = [*modelfleet_command(), "run", "stories260K", STORY, "--temperature", "0", "--max-tokens", "12"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(LILY)
    argv = [*modelfleet_command(), "run", "no-such-model", STORY]
    missing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 4 and "model_file_not_found" in missing.stderr
