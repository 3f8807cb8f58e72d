"""Backends on a real node: each file goes to the backend that can run it, chosen from its GGUF header, and the
operations that work on ctransformers work the same on llama.cpp. Files made on the fly in architectures the
old ctransformers cannot load (qwen2, a Llama-3-style BPE vocabulary), plus the real stories260K."""

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gguf import GGMLQuantizationType

from broker import keys
from broker.events import ModelEvent, parse_event
from tests.conftest import OPERATOR_KEY, READ_KEY, STORIES, Api, Fleet, Worker, wait_for
from workers.gguf_factory import write_tiny_llama, write_tiny_llama3, write_tiny_qwen2, write_unknown_architecture

pytestmark = pytest.mark.timeout(180)
LILY = ", there was a little girl named Lily"

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed: pip install 'modelfleet[llama-cpp]'"
)


@pytest.fixture(scope="module")
def backend_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backend-models")
    write_tiny_llama(root / "old-llama.gguf")
    write_tiny_qwen2(root / "qwen2-tiny.gguf")
    write_tiny_llama3(root / "llama3-tiny.gguf")
    write_tiny_llama(root / "llama-bf16.gguf", weight_type=GGMLQuantizationType.BF16)  # a type ctransformers predates
    write_unknown_architecture(root / "alien.gguf")
    if STORIES.exists():
        shutil.copy(STORIES, root / "stories260K.gguf")
        shutil.copy(STORIES, root / "stories-llama.gguf")  # the same file, loaded with llama.cpp beside it
    return root


@pytest.fixture(scope="module")
def auto_node(module_fleet: Fleet, backend_models: Path) -> Worker:
    return module_fleet.worker("auto-node", backend_models)


@pytest.fixture(scope="module")
def fixed_node(module_fleet: Fleet, backend_models: Path) -> Worker:
    return module_fleet.worker("ct-node", backend_models, "--backend", "ctransformers")


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, auto_node: Worker, fixed_node: Worker) -> Api:
    return module_fleet.api()


@pytest.fixture
def op(api: Api, auto_node: Worker, fixed_node: Worker) -> Iterator[httpx.Client]:
    with api.client(OPERATOR_KEY) as client:
        yield client
        for node in (auto_node, fixed_node):
            client.post(f"/api/v1/nodes/{node.fingerprint}/models/unload-all")


def load(op: httpx.Client, node: Worker, model: str, **fields: Any) -> httpx.Response:
    return op.post(f"/api/v1/nodes/{node.fingerprint}/models/load", json={"modelId": model, **fields})


def listed(op: httpx.Client, node: Worker) -> dict[str, dict[str, Any]]:
    response = op.get(f"/api/v1/nodes/{node.fingerprint}/models")
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["data"]}


def catalog(op: httpx.Client, node: Worker) -> dict[str, dict[str, Any]]:
    response = op.get(f"/api/v1/nodes/{node.fingerprint}/catalog")
    assert response.status_code == 200, response.text
    return {f["id"]: f for f in response.json()["files"]}


def model_events(fleet: Fleet, node: Worker, model: str) -> list[ModelEvent]:
    stream = fleet.redis.client().xrange(keys.events_stream())
    events = [parse_event(fields[b"event"]) for _, fields in stream if b"event" in fields]
    return [e for e in events if isinstance(e, ModelEvent) and e.node == node.fingerprint and e.model_id == model]


def test_a_file_no_backend_can_run_ends_failed_with_the_reason(
    module_fleet: Fleet, op: httpx.Client, auto_node: Worker
) -> None:
    response = load(op, auto_node, "alien")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "backend_unavailable"
    assert "no backend can run it" in body["error"] and "architecture nosucharch" in body["error"]
    model = listed(op, auto_node)["alien"]
    assert model["state"] == "failed" and model["error"] == body["error"] and model["backend"] is None
    failed = [e for e in model_events(module_fleet, auto_node, "alien") if e.type == "model-load-failed"]
    assert failed and failed[-1].error == body["error"]


def refuses_what_only_llama_cpp_runs(op: httpx.Client, node: Worker, needs: str) -> None:
    """On a node that runs ctransformers alone, the qwen2 file's load fails (and the Llama-3 file's catalog entry
    says why it would) with `needs` as the reason, and the old llama still loads with ctransformers."""
    response = load(op, node, "qwen2-tiny")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == f"Cannot load qwen2-tiny.gguf: architecture qwen2 needs the llama-cpp {needs}."
    assert listed(op, node)["qwen2-tiny"]["state"] == "failed"
    assert catalog(op, node)["llama3-tiny"]["problem"] == (
        f"Cannot load llama3-tiny.gguf: a gpt2 (byte-level BPE) vocabulary needs the llama-cpp {needs}."
    )
    assert load(op, node, "old-llama").status_code == 200
    assert listed(op, node)["old-llama"]["backend"] == "ctransformers"


def test_a_node_where_llama_cpp_is_not_installed_says_how_to_install_it(
    module_fleet: Fleet, backend_models: Path, op: httpx.Client, tmp_path: Path
) -> None:
    """The issue's example, on a real `auto` node that cannot import llama_cpp. Where the extra is installed, a
    package of that name that fails to import, first on the node's PYTHONPATH, makes it absent for that node."""
    env = {}
    if HAVE_LLAMA_CPP:
        (tmp_path / "llama_cpp").mkdir()
        (tmp_path / "llama_cpp" / "__init__.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    node = module_fleet.worker("no-llama-node", backend_models, **env)
    try:
        assert "not installed: llama-cpp" in node.log()
        refuses_what_only_llama_cpp_runs(op, node, "backend: pip install 'modelfleet[llama-cpp]'")
    finally:
        node.stop()


def test_a_node_without_llama_cpp_names_what_is_missing(op: httpx.Client, fixed_node: Worker) -> None:
    refuses_what_only_llama_cpp_runs(op, fixed_node, "backend, but this node runs only --backend ctransformers")


def test_an_unknown_backend_is_bad_input_and_changes_nothing(op: httpx.Client, auto_node: Worker) -> None:
    response = load(op, auto_node, "old-llama", backend="vllm")
    assert response.status_code == 422 and response.json()["code"] == "invalid_request", response.text
    assert "old-llama" not in listed(op, auto_node)
    assert load(op, auto_node, "old-llama", backend="Not A Name").status_code == 422


def test_the_catalog_shows_the_backend_each_file_would_use(op: httpx.Client, auto_node: Worker) -> None:
    response = op.get("/v1/models")
    assert response.status_code == 200, response.text
    entries = {m["id"]: m for m in response.json()["data"]}
    assert entries["old-llama"]["backends"] == ["ctransformers"]
    assert entries["alien"]["backends"] == []
    assert entries["qwen2-tiny"]["backends"] == (["llama-cpp"] if HAVE_LLAMA_CPP else [])
    files = catalog(op, auto_node)
    assert files["old-llama"]["backend"] == "ctransformers" and files["old-llama"]["estimateBytes"] > 0
    assert files["alien"]["backend"] is None and "no backend can run it" in files["alien"]["problem"]
    for name in ("qwen2-tiny", "llama3-tiny"):
        assert files[name]["backend"] == ("llama-cpp" if HAVE_LLAMA_CPP else None)
        assert (files[name]["problem"] is None) == HAVE_LLAMA_CPP


@needs_llama_cpp
def test_a_node_run_with_backend_llama_cpp_loads_every_model_with_it(
    module_fleet: Fleet, backend_models: Path, op: httpx.Client
) -> None:
    node = module_fleet.worker("llama-node", backend_models, "--backend", "llama-cpp")
    try:
        assert catalog(op, node)["old-llama"]["backend"] == "llama-cpp"
        response = load(op, node, "old-llama")
        assert response.status_code == 200, response.text
        assert listed(op, node)["old-llama"]["backend"] == "llama-cpp"
        refused = load(op, node, "qwen2-tiny", backend="ctransformers")
        assert refused.status_code == 422, refused.text
        assert "this node runs only --backend llama-cpp" in refused.json()["error"]
    finally:
        node.stop()


@needs_llama_cpp
@pytest.mark.parametrize("model", ["qwen2-tiny", "llama3-tiny", "llama-bf16"])
def test_auto_loads_todays_architectures_with_llama_cpp(op: httpx.Client, auto_node: Worker, model: str) -> None:
    response = load(op, auto_node, model, contextLength=256, gpuLayers=-1)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "loaded"
    info = listed(op, auto_node)[model]
    assert info["backend"] == "llama-cpp" and info["healthy"] is True
    assert info["contextLength"] == 256 and info["gpuLayers"] == 3  # two blocks and the output layer


def pool_load(op: httpx.Client, node: Worker, model: str, **fields: Any) -> httpx.Response:
    return op.post("/v1/models/load", json={"model_name": model, "node": node.fingerprint, **fields})


@needs_llama_cpp
@pytest.mark.parametrize("backend", ["ctransformers", "llama-cpp"])
def test_every_operation_works_on_both_backends(
    module_fleet: Fleet, op: httpx.Client, auto_node: Worker, backend: str
) -> None:
    if not STORIES.exists():
        pytest.skip(f"the real model is not at {STORIES}")
    first = pool_load(op, auto_node, "stories260K", backend=backend)
    assert first.status_code == 200, first.text
    assert listed(op, auto_node)["stories260K"]["backend"] == backend
    assert listed(op, auto_node)["stories260K"]["contextLength"] == 512  # the same default on both
    again = pool_load(op, auto_node, "stories260K", backend=backend, force_reload=True)
    assert again.status_code == 200 and again.json()["already_loaded"] is False, again.text
    pinned = pool_load(op, auto_node, "stories260K", pin=True)
    assert pinned.status_code == 200 and pinned.json()["already_loaded"] is True, pinned.text
    assert listed(op, auto_node)["stories260K"]["pinned"] is True
    assert listed(op, auto_node)["stories260K"]["backend"] == backend
    unloaded = op.post(f"/api/v1/nodes/{auto_node.fingerprint}/models/unload", json={"modelId": "stories260K"})
    assert unloaded.status_code == 200, unloaded.text
    assert "stories260K" not in listed(op, auto_node)

    def told() -> list[tuple[str, str | None]]:
        events = model_events(module_fleet, auto_node, "stories260K")
        return [(e.type, e.model.backend) for e in events if e.model.backend == backend]

    # The load, the force reload (the old copy goes, a new one comes), the unload: each told with its backend.
    cycle = [("model-loading", backend), ("model-loaded", backend), ("model-checked", backend)]
    cycle += [("model-unloading", backend), ("model-unloaded", backend)]
    wait_for(lambda: told()[-10:] == cycle * 2, 10, f"the events of every step on {backend}")


@needs_llama_cpp
def test_admission_and_eviction_cross_backends(module_fleet: Fleet, backend_models: Path, op: httpx.Client) -> None:
    from workers.backends import build_backends
    from workers.settings import WorkerSettings

    plan = build_backends(WorkerSettings(models_dir=backend_models, threads=1)).plan
    qwen2, old, llama3 = (plan(backend_models / f"{m}.gguf", None) for m in ("qwen2-tiny", "old-llama", "llama3-tiny"))
    assert (qwen2.backend, old.backend, llama3.backend) == ("llama-cpp", "ctransformers", "llama-cpp")
    budget = qwen2.estimate_bytes + old.estimate_bytes + llama3.estimate_bytes - 1  # two fit, three do not
    node = module_fleet.worker(
        "evict-node", backend_models, "--memory-budget", str(budget), MODELFLEET_MEASURE_LOADS="false"
    )
    try:
        assert pool_load(op, node, "qwen2-tiny").status_code == 200
        assert pool_load(op, node, "old-llama").status_code == 200
        full = pool_load(op, node, "llama3-tiny")
        assert full.status_code == 409 and full.json()["details"]["needed_bytes"] == llama3.estimate_bytes, full.text
        evicting = pool_load(op, node, "llama3-tiny", evict=True)
        assert evicting.status_code == 200, evicting.text
        assert evicting.json()["evicted"] == ["qwen2-tiny"]
        models = listed(op, node)
        assert models["llama3-tiny"]["backend"] == "llama-cpp" and models["old-llama"]["backend"] == "ctransformers"
    finally:
        node.stop()


def complete(node: Worker, model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0} | fields
    with node.inference() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def shape(value: Any) -> Any:
    """The keys of an answer, at every depth, with the values' types: what must not depend on the backend."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


@needs_llama_cpp
def test_stories260k_continues_the_same_on_both_backends(op: httpx.Client, auto_node: Worker) -> None:
    if not STORIES.exists():
        pytest.skip(f"the real model is not at {STORIES}")
    assert load(op, auto_node, "stories260K").status_code == 200
    assert load(op, auto_node, "stories-llama", backend="llama-cpp").status_code == 200
    models = listed(op, auto_node)
    assert (models["stories260K"]["backend"], models["stories-llama"]["backend"]) == ("ctransformers", "llama-cpp")
    old, new = complete(auto_node, "stories260K"), complete(auto_node, "stories-llama")
    assert old["choices"][0]["text"].startswith(LILY) and new["choices"][0]["text"] == old["choices"][0]["text"]
    assert new["usage"] == old["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    assert shape(new) == shape(old)


@needs_llama_cpp
@pytest.mark.parametrize("model", ["qwen2-tiny", "llama3-tiny"])
def test_todays_architectures_answer_through_the_node_endpoint(op: httpx.Client, auto_node: Worker, model: str) -> None:
    assert load(op, auto_node, model).status_code == 200
    assert load(op, auto_node, "old-llama").status_code == 200
    answer = complete(auto_node, model, max_tokens=5)
    assert answer["object"] == "text_completion" and answer["model"] == model
    assert answer["choices"][0]["finish_reason"] in {"stop", "length"}
    assert 0 < answer["usage"]["completion_tokens"] <= 5 and answer["usage"]["prompt_tokens"] > 0
    assert shape(answer) == shape(complete(auto_node, "old-llama", max_tokens=5))
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 4}
    with auto_node.inference() as client:
        whole = client.post("/v1/chat/completions", json=chat | {"temperature": 0})
        with client.stream("POST", "/v1/chat/completions", json=chat | {"stream": True, "temperature": 0}) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert whole.status_code == 200, whole.text
    # The model's own template (ChatML or Llama 3's) with its special tokens, each one token: a few dozen at most.
    assert 8 < whole.json()["usage"]["prompt_tokens"] < 40
    assert events[-1] == "[DONE]"
    streamed = "".join(
        (json.loads(e)["choices"] or [{"delta": {}}])[0]["delta"].get("content") or "" for e in events[:-1]
    )
    assert streamed == whole.json()["choices"][0]["message"]["content"]


@needs_llama_cpp
def test_the_head_serves_both_backends_with_the_same_shapes(op: httpx.Client, api: Api, auto_node: Worker) -> None:
    """Through the head's OpenAI routes: the qwen2 and Llama-3-style models on llama.cpp and an old llama on
    ctransformers, all loaded by `auto`, streamed and not."""
    models = ("qwen2-tiny", "llama3-tiny", "old-llama")
    for model in models:
        assert load(op, auto_node, model).status_code == 200
    assert [listed(op, auto_node)[m]["backend"] for m in models] == ["llama-cpp", "llama-cpp", "ctransformers"]
    answers: dict[str, Any] = {}
    with api.client(READ_KEY) as reader:
        for model in models:
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
            response = reader.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            answers[model] = response.json()
            assert answers[model]["usage"]["completion_tokens"] > 0
            with reader.stream("POST", "/v1/completions", json=body | {"stream": True}) as streamed:
                assert streamed.status_code == 200
                events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            text = "".join(c["choices"][0]["text"] for e in events[:-1] if (c := json.loads(e))["choices"])
            assert text == answers[model]["choices"][0]["text"]
    assert shape(answers["qwen2-tiny"]) == shape(answers["llama3-tiny"]) == shape(answers["old-llama"])
    for model in ("qwen2-tiny", "llama3-tiny"):
        direct = complete(auto_node, model, max_tokens=5)
        assert answers[model]["choices"][0]["text"] == direct["choices"][0]["text"]
