"""The node-addressed API against a real fleet: every row of the error table that needs no fault injection,
and the success bodies remote-model-control.txt promises. (Faults: test_faults.py; fleets: test_fleet.py.)"""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker import keys
from tests.conftest import OPERATOR_KEY, READ_KEY, Api, Fleet, Worker, queued

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker("api-node", models_dir)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker) -> Api:
    return module_fleet.api()


@pytest.fixture
def op(api: Api, node: Worker) -> Iterator[httpx.Client]:
    with api.client(OPERATOR_KEY) as client:
        yield client
        client.post(f"/api/v1/nodes/{node.fingerprint}/models/unload-all")


def models_url(node: Worker, action: str = "") -> str:
    return f"/api/v1/nodes/{node.fingerprint}/models" + (f"/{action}" if action else "")


def test_load_list_unload_bodies(op: httpx.Client, node: Worker, models_dir: Path) -> None:
    loaded = op.post(models_url(node, "load"), json={"modelId": "tiny-a", "contextLength": 256, "gpuLayers": -1})
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert body["success"] is True and body["modelId"] == "tiny-a" and body["node"] == node.fingerprint
    assert body["state"] == "loaded" and body["alreadyLoaded"] is False and body["loadSeconds"] >= 0

    again = op.post(models_url(node, "load"), json={"modelId": "tiny-a"}).json()
    assert again["alreadyLoaded"] is True and again["success"] is True

    [model] = op.get(models_url(node)).json()["data"]
    assert model["id"] == "tiny-a" and model["state"] == "loaded" and model["healthy"] is True
    assert model["endpoint"] == node.endpoint and model["contextLength"] == 256  # the node serves it
    assert Path(model["path"]) == (models_dir / "tiny-a.gguf").resolve()
    assert model["sizeBytes"] == (models_dir / "tiny-a.gguf").stat().st_size and model["loadedAt"]

    unloaded = op.post(models_url(node, "unload"), json={"modelId": "tiny-a"})
    assert unloaded.status_code == 200 and unloaded.json() == {
        "success": True,
        "modelId": "tiny-a",
        "node": node.fingerprint,
        "state": "unloaded",
    }
    assert op.get(models_url(node)).json() == {"data": []}


def test_model_path_relative_absolute_and_nested(op: httpx.Client, node: Worker, models_dir: Path) -> None:
    nested = op.post(models_url(node, "load"), json={"modelId": "org/nested"})
    assert nested.status_code == 200, nested.text
    relative = op.post(models_url(node, "load"), json={"modelId": "b", "modelPath": "tiny-b.gguf"})
    assert relative.status_code == 200, relative.text
    absolute = op.post(models_url(node, "load"), json={"modelId": "c", "modelPath": str(models_dir / "tiny-c.gguf")})
    assert absolute.status_code == 200, absolute.text
    listed = {m["id"]: m["path"] for m in op.get(models_url(node)).json()["data"]}
    assert listed == {
        "org/nested": str((models_dir / "org" / "nested.gguf").resolve()),
        "b": str((models_dir / "tiny-b.gguf").resolve()),
        "c": str((models_dir / "tiny-c.gguf").resolve()),
    }
    result = op.post(models_url(node, "unload-all")).json()
    assert result["success"] is True and sorted(result["unloaded"]) == ["b", "c", "org/nested"]
    assert result["errors"] == [] and op.get(models_url(node)).json()["data"] == []


def test_unknown_fingerprint_is_404_and_enqueues_nothing(op: httpx.Client, module_fleet: Fleet) -> None:
    for fp in ("0" * 32, "not-a-fingerprint", "..%2F..%2Fetc"):
        for method, path, body in [
            ("GET", f"/api/v1/nodes/{fp}/models", None),
            ("POST", f"/api/v1/nodes/{fp}/models/load", {"modelId": "tiny-a"}),
            ("POST", f"/api/v1/nodes/{fp}/models/unload", {"modelId": "tiny-a"}),
            ("POST", f"/api/v1/nodes/{fp}/models/unload-all", None),
            ("GET", f"/api/v1/nodes/{fp}", None),
        ]:
            response = op.request(method, path, json=body)
            assert response.status_code == 404, (fp, path, response.text)
            assert response.json()["success"] is False
    assert module_fleet.redis.client().llen(keys.node_queue("0" * 32)) == 0


@pytest.mark.parametrize(
    ("model_id", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../escape", ".."),
        ("a/../../b", ".."),
        ("/etc/passwd", "slash"),
        ("bad\nid", "control"),
        ("tab\tid", "control"),
        ("x" * 129, "128"),
    ],
)
def test_bad_model_ids_are_422_before_enqueue(
    op: httpx.Client, node: Worker, module_fleet: Fleet, model_id: str, reason: str
) -> None:
    for action in ("load", "unload"):
        response = op.post(models_url(node, action), json={"modelId": model_id})
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["success"] is False and body["code"] == "invalid_request" and reason in body["error"]
    assert queued(module_fleet, node) == 0


def test_malformed_bodies_are_422(op: httpx.Client, node: Worker) -> None:
    cases = [
        {},
        {"modelId": 7},
        {"modelId": "tiny-a", "contextLength": 0},
        {"modelId": "tiny-a", "gpuLayers": -2},
        {"modelId": "tiny-a", "unknownField": 1},
    ]
    for body in cases:
        response = op.post(models_url(node, "load"), json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["code"] == "invalid_request"
    not_json = op.post(models_url(node, "load"), content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["success"] is False


def test_model_path_outside_models_dir_is_refused_by_the_node(op: httpx.Client, node: Worker) -> None:
    for body in (
        {"modelId": "x", "modelPath": "/etc/passwd"},
        {"modelId": "x", "modelPath": "../outside.gguf"},
        {"modelId": "escape"},  # a symlink inside the dir that points outside it
    ):
        response = op.post(models_url(node, "load"), json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["code"] == "path_outside_models_dir"
    assert op.get(models_url(node)).json()["data"] == []


def test_missing_file_and_not_loaded_are_404_with_node_codes(op: httpx.Client, node: Worker) -> None:
    missing = op.post(models_url(node, "load"), json={"modelId": "no-such-model"})
    assert missing.status_code == 404 and missing.json()["code"] == "model_file_not_found"
    assert "no-such-model.gguf" in missing.json()["error"]
    not_loaded = op.post(models_url(node, "unload"), json={"modelId": "tiny-a"})
    assert not_loaded.status_code == 404 and not_loaded.json()["code"] == "model_not_loaded"
    loop = op.post(models_url(node, "load"), json={"modelId": "loop"})  # a symlink to itself
    assert loop.status_code == 404 and loop.json()["code"] == "model_file_not_found", loop.text
    assert "cannot be reached" in loop.json()["error"]


def test_unloadable_file_is_422_and_recorded_as_failed(op: httpx.Client, node: Worker) -> None:
    response = op.post(models_url(node, "load"), json={"modelId": "broken"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_model_file" and "GGUF" in response.json()["error"]
    [listed] = op.get(models_url(node)).json()["data"]
    assert listed["id"] == "broken" and listed["state"] == "failed" and listed["healthy"] is False
    assert listed["error"] == response.json()["error"]


def test_missing_and_wrong_keys_are_401_with_bearer_challenge(api: Api, node: Worker) -> None:
    for key in (None, "wrong-key", ""):
        with api.client(key) as client:
            calls = [("GET", "/api/v1/nodes"), ("GET", models_url(node)), ("POST", models_url(node, "load"))]
            for method, path in calls:
                response = client.request(method, path, json={"modelId": "tiny-a"})
                assert response.status_code == 401, (key, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["code"] == "unauthenticated"
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Basic {OPERATOR_KEY}"}) as client:
        assert client.get("/api/v1/nodes").status_code == 401


def test_read_only_key_reads_but_cannot_change(api: Api, node: Worker, module_fleet: Fleet) -> None:
    with api.client(READ_KEY) as client:
        assert client.get("/api/v1/nodes").status_code == 200
        assert client.get(f"/api/v1/nodes/{node.fingerprint}").status_code == 200
        assert client.get(models_url(node)).status_code == 200
        for action, body in [("load", {"modelId": "tiny-a"}), ("unload", {"modelId": "tiny-a"}), ("unload-all", None)]:
            response = client.post(models_url(node, action), json=body)
            assert response.status_code == 403, response.text
            assert response.json()["code"] == "forbidden"
    assert queued(module_fleet, node) == 0
    with api.client(OPERATOR_KEY) as client:
        assert client.get(models_url(node)).json()["data"] == []


def test_nodes_listing(api: Api, node: Worker, models_dir: Path) -> None:
    with api.client(READ_KEY) as client:
        nodes = client.get("/api/v1/nodes").json()["data"]
        [me] = [n for n in nodes if n["fingerprint"] == node.fingerprint]
        assert me["online"] is True and me["consuming"] is True and me["name"] == "api-node"
        assert me["modelsDir"] == str(models_dir.resolve()) and me["queue"] == keys.node_queue(node.fingerprint)
        for field in ("hostname", "version", "bootId", "startedAt", "lastHeartbeat", "modelsLoaded", "rssBytes"):
            assert field in me
        assert client.get(f"/api/v1/nodes/{node.fingerprint}").json()["fingerprint"] == node.fingerprint


def test_model_ids_are_percent_encoded_in_urls_and_keys() -> None:
    assert keys.encode_id("org/model name?x=1#f") == "org%2Fmodel%20name%3Fx%3D1%23f"


def test_unknown_route_and_method_answer_json(api: Api) -> None:
    with api.client(OPERATOR_KEY) as client:
        missing = client.get("/api/v1/nope")
        assert missing.status_code == 404 and missing.json()["success"] is False
        wrong = client.delete("/api/v1/nodes")
        assert wrong.status_code == 405 and wrong.json()["success"] is False


def test_a_symlink_loop_in_the_models_dir_does_not_stop_the_heartbeat(
    op: httpx.Client, node: Worker, models_dir: Path
) -> None:
    """A link to itself made while the node runs: its resolve() raised RuntimeError in the heartbeat's scan of
    the models directory, which ended the heartbeat thread; the node went offline for good while it still took
    jobs. (`loop.gguf`, there from the start, broke the first scan instead, and the node's files went unlisted.)"""
    link = models_dir / "late-loop.gguf"
    link.symlink_to(link)
    try:
        beats = set()
        deadline = time.monotonic() + 15
        while len(beats) < 4 and time.monotonic() < deadline:  # the default beat is every 2 s
            info = op.get(f"/api/v1/nodes/{node.fingerprint}").json()
            assert info["online"], info
            beats.add(info["lastHeartbeat"])
            time.sleep(0.5)
        assert len(beats) >= 4, "the node stopped beating"
        files = {f["id"] for f in op.get(f"/api/v1/nodes/{node.fingerprint}/catalog").json()["files"]}
        assert "tiny-a" in files and "late-loop" not in files and "loop" not in files
    finally:
        link.unlink()
