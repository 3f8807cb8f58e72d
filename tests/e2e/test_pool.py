"""The fleet as one pool (`/v1/models`), with memory admission, against real workers and real GGUF files.

Two nodes share this module. Their budgets are set in bytes from the files' own estimates, so every figure
below is exact: `alpha` holds three small models and a half, `beta` one and a half.

    alpha: s1 s2 s3 s4 (small), d1 (double), t3 (triple), shared (small), huge   budget 3.5 small
    beta:  pairx pairy rival1..rival6 (small), shared (small), huge                budget 1.5 small
"""

import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import keys
from tests.conftest import OPERATOR_KEY, READ_KEY, Api, Fleet, Worker, wait_for
from workers.backend import estimate_memory_bytes
from workers.gguf_factory import write_tiny_llama

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    small: int
    double: int
    triple: int
    huge: int

    @property
    def alpha_budget(self) -> int:
        return 3 * self.small + self.small // 2

    @property
    def beta_budget(self) -> int:
        return self.small + self.small // 2


@dataclass(frozen=True)
class Dirs:
    alpha: Path
    beta: Path
    sizes: Sizes


# These tests size budgets from the estimates to the byte; measured corrections (tested in test_memory.py)
# would add a few hundred KB of llama.cpp buffers per load and blur that arithmetic.
EXACT = {"MODELFLEET_MEASURE_LOADS": "false"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    made = tmp_path_factory.mktemp("pool-files")
    small = write_tiny_llama(made / "small.gguf", pad_to_bytes=2 * MIB)
    double = write_tiny_llama(made / "double.gguf", pad_to_bytes=4 * MIB)
    triple = write_tiny_llama(made / "triple.gguf", pad_to_bytes=6 * MIB)
    huge = write_tiny_llama(made / "huge.gguf", pad_to_bytes=16 * MIB)
    layout = {
        "alpha": {"s1": small, "s2": small, "s3": small, "s4": small, "d1": double, "t3": triple},
        "beta": {"pairx": small, "pairy": small, **{f"rival{i}": small for i in range(1, 7)}},
    }
    roots = {}
    for node, files in layout.items():
        root = tmp_path_factory.mktemp(f"models-{node}")
        for name, source in {**files, "shared": small, "huge": huge}.items():
            shutil.copy(source, root / f"{name}.gguf")
        roots[node] = root
    sizes = Sizes(*(estimate_memory_bytes(p, None) for p in (small, double, triple, huge)))
    assert 2 * sizes.small > sizes.double > sizes.small + sizes.small // 2  # d1 needs two smalls evicted
    assert sizes.alpha_budget - sizes.small < sizes.triple <= sizes.alpha_budget  # t3 fits only a free alpha
    return Dirs(roots["alpha"], roots["beta"], sizes)


@pytest.fixture(scope="module")
def alpha(module_fleet: Fleet, dirs: Dirs) -> Worker:
    return module_fleet.worker("alpha", dirs.alpha, "--memory-budget", str(dirs.sizes.alpha_budget), **EXACT)


@pytest.fixture(scope="module")
def beta(module_fleet: Fleet, dirs: Dirs) -> Worker:
    return module_fleet.worker("beta", dirs.beta, "--memory-budget", str(dirs.sizes.beta_budget), **EXACT)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, alpha: Worker, beta: Worker) -> Api:
    return module_fleet.api()


@pytest.fixture
def op(api: Api) -> Iterator[httpx.Client]:
    with api.client(OPERATOR_KEY) as client:
        assert client.post("/v1/models/unload-all").status_code == 200
        yield client
        client.post("/v1/models/unload-all")


def load(client: httpx.Client, model: str, **options: Any) -> httpx.Response:
    return client.post("/v1/models/load", json={"model_name": model, **options})


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(response.json())


def node_models(client: httpx.Client, node: Worker) -> dict[str, dict[str, Any]]:
    status = ok(client.get("/v1/models/status"))
    return {m["id"]: m for m in status["nodes"][node.fingerprint]["models"]}


def test_placement_picks_the_node_with_room(op: httpx.Client, alpha: Worker, beta: Worker, dirs: Dirs) -> None:
    first = ok(load(op, "shared"))
    assert first["node"] == alpha.fingerprint, "both have the file and room; alpha has the most free"
    assert first["status"] == "success" and first["evicted"] == [] and first["force_reload"] is False
    ok(op.post("/v1/models/unload", json={"model_name": "shared"}))

    for model in ("s1", "s2", "s3"):
        assert ok(load(op, model))["node"] == alpha.fingerprint
    second = ok(load(op, "shared"))
    assert second["node"] == beta.fingerprint, "alpha has the bigger budget but no longer the room"

    again = ok(load(op, "shared"))
    assert again["node"] == beta.fingerprint and again["already_loaded"] is True
    assert "already loaded" in again["message"]

    listed = {m["id"]: m for m in ok(op.get("/v1/models"))["data"]}
    assert sorted(listed["shared"]["nodes"]) == sorted([alpha.fingerprint, beta.fingerprint])
    assert listed["shared"]["loaded_on"] == [beta.fingerprint] and listed["shared"]["state"] == "loaded"
    assert listed["s1"]["nodes"] == [alpha.fingerprint] and listed["s1"]["loaded_on"] == [alpha.fingerprint]
    assert listed["pairx"]["nodes"] == [beta.fingerprint] and listed["pairx"]["loaded_on"] == []
    assert listed["s4"]["estimate_bytes"] == dirs.sizes.small
    assert listed["s4"]["size_bytes"] == (dirs.alpha / "s4.gguf").stat().st_size


def test_a_load_that_fits_nowhere_is_409_with_the_figures(op: httpx.Client, alpha: Worker, dirs: Dirs) -> None:
    sizes = dirs.sizes
    for evict in (False, True):
        refused = load(op, "huge", evict=evict)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["success"] is False and body["code"] == "insufficient_memory"
        details = body["details"]
        assert details["node"] == alpha.fingerprint and details["node_name"] == "alpha"
        assert details["needed_bytes"] == sizes.huge and details["free_bytes"] == sizes.alpha_budget
        assert details["budget_bytes"] == sizes.alpha_budget
        assert details["shortfall_bytes"] == sizes.huge - sizes.alpha_budget
        assert str(sizes.huge - sizes.alpha_budget) in body["error"]
    assert ok(op.get("/v1/models/status"))["loaded"] == []


def test_node_addressed_loads_are_admitted_too(op: httpx.Client, beta: Worker, dirs: Dirs) -> None:
    url = f"/api/v1/nodes/{beta.fingerprint}/models/load"
    assert op.post(url, json={"modelId": "pairx"}).status_code == 200
    refused = op.post(url, json={"modelId": "pairy"})
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "insufficient_memory" and body["success"] is False
    assert body["details"] == {
        "needed_bytes": dirs.sizes.small,
        "free_bytes": dirs.sizes.beta_budget - dirs.sizes.small,
        "budget_bytes": dirs.sizes.beta_budget,
    }


def concurrently(*calls: Any) -> list[httpx.Response]:
    barrier = threading.Barrier(len(calls))
    results: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


@pytest.mark.parametrize("route", ["pool", "node"])
def test_concurrent_loads_that_fit_one_at_a_time(api: Api, op: httpx.Client, beta: Worker, route: str) -> None:
    def call(model: str) -> Any:
        def send() -> httpx.Response:
            with api.client(OPERATOR_KEY) as client:
                if route == "pool":
                    return load(client, model)
                return client.post(f"/api/v1/nodes/{beta.fingerprint}/models/load", json={"modelId": model})

        return send

    # Each fits beta alone, no two fit together. Six at once make overlapping admissions likely.
    responses = concurrently(*(call(f"rival{i}") for i in range(1, 7)))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 5, [r.text for r in responses]
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"insufficient_memory"}
    loaded = [m for m, info in node_models(op, beta).items() if info["state"] == "loaded"]
    assert len(loaded) == 1


def test_eviction_is_least_recently_used_and_spares_pinned(op: httpx.Client, alpha: Worker, dirs: Dirs) -> None:
    sizes = dirs.sizes
    assert ok(load(op, "s1", pin=True))["node"] == alpha.fingerprint  # the oldest, but pinned
    ok(load(op, "s2"))
    ok(load(op, "s3"))

    full = load(op, "s4")
    assert full.status_code == 409 and full.json()["details"]["node"] == alpha.fingerprint
    assert full.json()["details"]["shortfall_bytes"] == sizes.small - (sizes.alpha_budget - 3 * sizes.small)
    assert set(node_models(op, alpha)) == {"s1", "s2", "s3"}, "a refused load evicts nothing"

    one = ok(load(op, "s4", evict=True))
    assert one["evicted"] == ["s2"] and one["node"] == alpha.fingerprint and "s2" in one["message"]
    two = ok(load(op, "d1", evict=True))
    assert two["evicted"] == ["s3", "s4"]
    models = node_models(op, alpha)
    assert set(models) == {"s1", "d1"} and models["s1"]["pinned"] is True and models["d1"]["pinned"] is False

    # t3 fits an empty alpha, but not beside the pinned s1: refused, and d1 is not evicted for nothing.
    refused = load(op, "t3", evict=True)
    assert refused.status_code == 409, refused.text
    assert refused.json()["details"]["shortfall_bytes"] == sizes.triple - (sizes.alpha_budget - sizes.small)
    assert set(node_models(op, alpha)) == {"s1", "d1"}
    memory = ok(op.get("/v1/models/status"))["nodes"][alpha.fingerprint]["memory"]
    assert memory == {
        "budget_bytes": sizes.alpha_budget,
        "used_bytes": sizes.small + sizes.double,
        "free_bytes": sizes.alpha_budget - sizes.small - sizes.double,
        "evictable_bytes": sizes.double,
    }


def test_force_reload_loads_afresh(op: httpx.Client, alpha: Worker) -> None:
    first = ok(load(op, "s1"))
    loaded_at = node_models(op, alpha)["s1"]["loaded_at"]
    same = ok(load(op, "s1"))
    assert same["already_loaded"] is True and node_models(op, alpha)["s1"]["loaded_at"] == loaded_at
    again = ok(load(op, "s1", force_reload=True))
    assert again["force_reload"] is True and again["already_loaded"] is False
    assert again["node"] == first["node"] == alpha.fingerprint
    after = node_models(op, alpha)["s1"]
    assert after["state"] == "loaded" and after["loaded_at"] > loaded_at


def test_not_found_unknown_node_and_not_loaded(op: httpx.Client, alpha: Worker) -> None:
    ghost = load(op, "ghost")
    assert ghost.status_code == 404 and ghost.json()["code"] == "model_file_not_found"
    stranger = load(op, "s1", node="0" * 32)
    assert stranger.status_code == 404 and stranger.json()["code"] == "node_not_found"
    elsewhere = load(op, "pairx", node=alpha.fingerprint)
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "model_file_not_found"
    pinned_there = ok(load(op, "shared", node=alpha.fingerprint))
    assert pinned_there["node"] == alpha.fingerprint
    unloaded = op.post("/v1/models/unload", json={"model_name": "s1"})
    assert unloaded.status_code == 404 and unloaded.json()["code"] == "model_not_loaded"
    for body in ({}, {"model_name": "../x"}, {"model_name": "s1", "surprise": 1}):
        bad = op.post("/v1/models/load", json=body)
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request", body
    traversal = op.post("/v1/models/load", json={"model_name": "../x"}).json()["error"]
    assert traversal.startswith("model_name: Invalid model id '../x'"), traversal  # this route's own field name


def test_unload_reaches_every_node_that_holds_the_model(op: httpx.Client, alpha: Worker, beta: Worker) -> None:
    for node in (alpha, beta):
        ok(load(op, "shared", node=node.fingerprint))
    body = ok(op.post("/v1/models/unload", json={"model_name": "shared"}))
    assert body["status"] == "success" and body["model"] == "shared" and body["errors"] == []
    assert sorted(body["nodes"]) == sorted([alpha.fingerprint, beta.fingerprint])
    assert ok(op.get("/v1/models/status"))["loading_status"]["shared"] == "unloaded"


def test_every_endpoint_with_both_scopes(api: Api, module_fleet: Fleet, alpha: Worker, beta: Worker) -> None:
    calls = [
        ("GET", "/v1/models", None, False),
        ("GET", "/v1/models/status", None, False),
        ("POST", "/v1/models/load", {"model_name": "s1"}, True),
        ("POST", "/v1/models/unload", {"model_name": "s1"}, True),
        ("POST", "/v1/models/unload-all", None, True),
    ]
    for key in (None, "not-a-key"):
        with api.client(key) as client:
            for method, path, body, _ in calls:
                response = client.request(method, path, json=body)
                assert response.status_code == 401 and response.json()["code"] == "unauthenticated", (key, path)
    with api.client(READ_KEY) as client:
        for method, path, body, operator_only in calls:
            response = client.request(method, path, json=body)
            if operator_only:
                assert response.status_code == 403, (path, response.text)
                assert response.json()["code"] == "forbidden" and response.json()["success"] is False
            else:
                assert response.status_code == 200, (path, response.text)
    redis = module_fleet.redis.client()
    assert redis.llen(keys.node_queue(alpha.fingerprint)) == redis.llen(keys.node_queue(beta.fingerprint)) == 0
    with api.client(OPERATOR_KEY) as client:
        for method, path, body, _ in calls:
            response = client.request(method, path, json=body)
            assert response.status_code == 200, (path, response.text)


class ModelLoadingClient:
    """A client written from model-loading.txt alone: its paths, its bodies and the fields it reads."""

    STATUSES = {"loaded", "loading", "unloaded", "failed"}

    def __init__(self, base_url: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.post(path, json=body) if body is not None else self.http.post(path)
        response.raise_for_status()
        return dict(response.json())

    def load_model(self, model_name: str, force_reload: bool = False) -> dict[str, Any]:
        result = self._post("/v1/models/load", {"model_name": model_name, "force_reload": force_reload})
        assert result["status"] == "success" and result["model"] == model_name
        assert result["force_reload"] is force_reload and isinstance(result["message"], str)
        return result

    def unload_model(self, model_name: str) -> dict[str, Any]:
        result = self._post("/v1/models/unload", {"model_name": model_name})
        assert result["status"] == "success" and result["model"] == model_name and isinstance(result["message"], str)
        return result

    def unload_all_models(self) -> dict[str, Any]:
        result = self._post("/v1/models/unload-all")
        assert result["status"] == "success" and isinstance(result["errors"], list)
        assert result["total_unloaded"] == len(result["unloaded_models"])
        return result

    def get_model_status(self) -> dict[str, Any]:
        response = self.http.get("/v1/models/status")
        response.raise_for_status()
        result = dict(response.json())
        assert isinstance(result["loaded"], list) and isinstance(result["repository"], str)
        assert set(result["loading_status"].values()) <= self.STATUSES
        return result


def test_a_client_built_from_the_document_works_against_the_head(api: Api, op: httpx.Client, dirs: Dirs) -> None:
    client = ModelLoadingClient(api.url, OPERATOR_KEY)
    before = client.get_model_status()
    assert before["loaded"] == [] and before["loading_status"]["s1"] == "unloaded"
    assert before["repository"] in {str(dirs.alpha.resolve()), str(dirs.beta.resolve())}

    assert client.load_model("s1")["message"].startswith("Model s1 loaded successfully")
    assert client.load_model("s1", force_reload=True)["message"].startswith("Model s1 loaded successfully")
    status = client.get_model_status()
    assert status["loaded"] == ["s1"] and status["loading_status"]["s1"] == "loaded"
    assert client.unload_model("s1")["message"].startswith("Model s1 unloaded successfully")

    client.load_model("s2")
    client.load_model("pairx")
    result = client.unload_all_models()
    assert result["unloaded_models"] == ["pairx", "s2"] and result["total_unloaded"] == 2 and result["errors"] == []
    assert client.get_model_status()["loaded"] == []


def test_status_with_a_node_offline(
    api: Api, op: httpx.Client, module_fleet: Fleet, alpha: Worker, beta: Worker, dirs: Dirs
) -> None:
    gamma_dir = dirs.alpha.parent / "models-gamma"
    gamma_dir.mkdir()
    shutil.copy(dirs.beta / "pairx.gguf", gamma_dir / "gamma-only.gguf")
    gamma = module_fleet.worker("gamma", gamma_dir, "--memory-budget", "1GiB", **EXACT)
    assert ok(op.get("/v1/models/status"))["nodes"][gamma.fingerprint]["online"] is True
    ok(load(op, "s1"))

    gamma.signal(signal.SIGKILL)
    gamma.wait(10)
    wait_for(
        lambda: op.get(f"/api/v1/nodes/{gamma.fingerprint}").json()["online"] is False,
        15,
        "the killed node to go offline",
    )
    with api.client(READ_KEY, timeout=10) as reader:
        status = ok(reader.get("/v1/models/status"))
    reported = status["nodes"][gamma.fingerprint]
    assert reported["online"] is False and reported["error"]["code"] == "node_offline"
    assert reported["name"] == "gamma" and "models" not in reported
    assert status["nodes"][alpha.fingerprint]["online"] is True
    assert status["nodes"][beta.fingerprint]["memory"]["budget_bytes"] == dirs.sizes.beta_budget
    assert status["loaded"] == ["s1"] and "gamma-only" not in status["loading_status"]
    assert module_fleet.redis.client().llen(keys.node_queue(gamma.fingerprint)) == 0, "an offline node got a job"

    assert load(op, "gamma-only").status_code == 404
    offline = load(op, "gamma-only", node=gamma.fingerprint)
    assert offline.status_code == 503 and offline.json()["code"] == "node_offline"
    everything = ok(op.post("/v1/models/unload-all"))
    assert everything["status"] == "success" and everything["unloaded_models"] == ["s1"]
    assert [(e["node"], e["code"]) for e in everything["errors"]] == [(gamma.fingerprint, "node_offline")]


def test_unload_reports_a_node_that_could_not_say_what_it_holds(fleet: Fleet, models_dir: Path) -> None:
    from tests.conftest import FREEZE_TTL, park, thaw

    stuck = fleet.worker("stuck", models_dir, MODELFLEET_HEARTBEAT_TTL=str(FREEZE_TTL))
    fine = fleet.worker("fine", models_dir)
    api = fleet.api(MODELFLEET_LIST_TIMEOUT="2")
    with api.client(OPERATOR_KEY) as client:
        ok(client.post(f"/api/v1/nodes/{fine.fingerprint}/models/load", json={"modelId": "tiny-a"}))
        park(fleet, stuck)
        try:
            body = ok(client.post("/v1/models/unload", json={"model_name": "tiny-a"}))
        finally:
            thaw(stuck)
    assert body["status"] == "partial" and body["nodes"] == [fine.fingerprint]
    assert [(e["node"], e["code"]) for e in body["errors"]] == [(stuck.fingerprint, "timeout")]
