"""What the reference documents promise about files that cannot be loaded and about `force_reload: false`.

model-loading.txt defines `failed` ("Model failed to load") among the status values, and `force_reload`
("Force reload even if already loaded", default false): without it a loaded model is left alone. A client
written from the documents must see a damaged file listed, its load end `failed` with the node's reason, and
a repeated load of a loaded model succeed whatever happened to its file since.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import OPERATOR_KEY, Api, Fleet, Worker
from workers.gguf_factory import write_not_gguf, write_tiny_llama, write_truncated_gguf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def own_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformance-models")
    write_tiny_llama(root / "good.gguf")
    write_tiny_llama(root / "doomed.gguf", seed=3)  # damaged on disk once loaded
    write_not_gguf(root / "notgguf.gguf")
    write_truncated_gguf(root / "cut.gguf")
    return root


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, own_models: Path) -> Worker:
    return module_fleet.worker("conformance", own_models)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker) -> Api:
    return module_fleet.api()


@pytest.fixture
def op(api: Api) -> Iterator[httpx.Client]:
    with api.client(OPERATOR_KEY) as client:
        yield client


def test_an_unloadable_file_is_listed_and_its_load_ends_failed_with_the_reason(op: httpx.Client, node: Worker) -> None:
    listed = {m["id"]: m for m in op.get("/v1/models").json()["data"]}
    assert sorted(listed) == ["cut", "doomed", "good", "notgguf"]
    for broken in ("cut", "notgguf"):
        entry = listed[broken]
        assert entry["nodes"] == [node.fingerprint] and entry["state"] == "unloaded"
        assert entry["estimate_bytes"] is None and entry["problem"] and "GGUF" in entry["problem"]
    assert listed["good"]["problem"] is None and listed["good"]["estimate_bytes"] > 0

    # The pool API (model-loading.txt): the node's reason, then `failed` in the status.
    pool = op.post("/v1/models/load", json={"model_name": "cut"})
    assert pool.status_code == 422, pool.text
    assert pool.json()["code"] == "invalid_model_file" and pool.json()["error"] == listed["cut"]["problem"]
    status = op.get("/v1/models/status").json()
    assert status["loading_status"]["cut"] == "failed" and status["loading_status"]["good"] == "unloaded"
    assert "cut" not in status["loaded"]

    # The node API (remote-model-control.txt): 422, and the node lists the model failed with that reason.
    direct = op.post(f"/api/v1/nodes/{node.fingerprint}/models/load", json={"modelId": "notgguf"})
    assert direct.status_code == 422 and direct.json()["code"] == "invalid_model_file", direct.text
    models = {m["id"]: m for m in op.get(f"/api/v1/nodes/{node.fingerprint}/models").json()["data"]}
    assert models["notgguf"]["state"] == "failed" and models["notgguf"]["healthy"] is False
    assert models["notgguf"]["error"] == direct.json()["error"]
    assert op.get("/v1/models/status").json()["loading_status"]["notgguf"] == "failed"


def test_force_reload_false_leaves_a_loaded_model_alone(op: httpx.Client, node: Worker, own_models: Path) -> None:
    first = op.post("/v1/models/load", json={"model_name": "doomed"})
    assert first.status_code == 200 and first.json()["status"] == "success", first.text
    write_not_gguf(own_models / "doomed.gguf")  # the file changes under the loaded model

    again = op.post("/v1/models/load", json={"model_name": "doomed", "force_reload": False})
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["status"] == "success" and body["force_reload"] is False and body["already_loaded"] is True
    direct = op.post(f"/api/v1/nodes/{node.fingerprint}/models/load", json={"modelId": "doomed"})
    assert direct.status_code == 200 and direct.json()["alreadyLoaded"] is True, direct.text

    # Asked to reload, the node reads the file and refuses it; the loaded copy stays, serving.
    forced = op.post("/v1/models/load", json={"model_name": "doomed", "force_reload": True})
    assert forced.status_code == 422 and forced.json()["code"] == "invalid_model_file", forced.text
    status = op.get("/v1/models/status").json()
    assert status["loading_status"]["doomed"] == "loaded" and "doomed" in status["loaded"]
