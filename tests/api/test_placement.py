"""Placement and pool views: pure functions over catalogs, built here as nodes would send them."""

import pytest

from api.placement import NodeView, plan_load, pool_state, refused
from api.pool import fleet_states, model_entries
from broker.errors import InsufficientMemory, ModelFileNotFound
from broker.schemas import MemoryInfo, ModelFile, ModelInfo, ModelState, NodeCatalog


def view(
    name: str,
    *,
    free: int | None,
    files: dict[str, int] | None = None,
    models: dict[str, ModelState] | None = None,
    evictable: int = 0,
    budget: int = 1000,
) -> NodeView:
    fp = name.ljust(16, "0")
    catalog = NodeCatalog(
        node=fp,
        files=[
            ModelFile(id=m, path=f"/m/{m}.gguf", size_bytes=size - 10, estimate_bytes=size)
            for m, size in (files or {}).items()
        ],
        models=[
            ModelInfo(id=m, path=f"/m/{m}.gguf", healthy=True, state=s, size_bytes=50)
            for m, s in (models or {}).items()
        ],
        memory=MemoryInfo(
            budget_bytes=None if free is None else budget,
            used_bytes=0 if free is None else budget - free,
            free_bytes=free,
            evictable_bytes=evictable,
        ),
    )
    return NodeView(fp, name, catalog)


def names(candidates: list) -> list[str]:  # type: ignore[type-arg]
    return [c.node.name for c in candidates]


def test_most_free_node_that_fits_comes_first() -> None:
    views = [
        view("small", free=300, files={"m": 200}),
        view("big", free=900, files={"m": 200}),
        view("tight", free=199, files={"m": 200}),
        view("without", free=1000, files={"other": 1}),
    ]
    plan = plan_load("m", views, evict=False)
    assert names(plan) == ["big", "small"]
    assert plan[0].model_path is None


def test_each_node_uses_its_own_estimate() -> None:
    views = [view("a", free=500, files={"m": 600}), view("b", free=400, files={"m": 300})]
    assert names(plan_load("m", views, evict=False)) == ["b"]


def test_unlimited_budget_always_fits_and_ranks_first() -> None:
    views = [view("bounded", free=900, files={"m": 10}), view("open", free=None, files={"m": 10})]
    assert names(plan_load("m", views, evict=False)) == ["open", "bounded"]


def test_loaded_or_loading_somewhere_goes_to_that_node() -> None:
    views = [
        view("empty", free=1000, files={"m": 100}),
        view("loading", free=10, files={"m": 100}, models={"m": ModelState.LOADING}),
        view("holder", free=5, files={"m": 100}, models={"m": ModelState.LOADED}),
        view("failed", free=1000, files={"m": 100}, models={"m": ModelState.FAILED}),
    ]
    plan = plan_load("m", views, evict=False)
    assert names(plan) == ["holder", "loading"] and plan[0].model_path == "/m/m.gguf"


def test_evict_adds_nodes_where_eviction_makes_room_after_those_that_fit() -> None:
    views = [
        view("fits", free=250, files={"m": 200}),
        view("crowded", free=100, evictable=600, files={"m": 200}),
        view("pinned", free=100, evictable=50, files={"m": 200}),
    ]
    assert names(plan_load("m", views, evict=False)) == ["fits"]
    assert names(plan_load("m", views, evict=True)) == ["fits", "crowded"]


def test_no_fit_names_the_best_candidate_and_the_shortfall() -> None:
    views = [
        view("a", free=300, files={"m": 800}, budget=700),
        view("b", free=500, files={"m": 800}, budget=900, evictable=100),
    ]
    with pytest.raises(InsufficientMemory) as info:
        plan_load("m", views, evict=False)
    details = info.value.details
    assert details["node"] == views[1].fingerprint and details["node_name"] == "b"
    assert (details["needed_bytes"], details["free_bytes"], details["budget_bytes"]) == (800, 500, 900)
    assert details["shortfall_bytes"] == 300 and "300 bytes short" in info.value.message
    with pytest.raises(InsufficientMemory) as evicting:
        plan_load("m", views, evict=True)
    assert evicting.value.details["shortfall_bytes"] == 200 and evicting.value.details["evictable_bytes"] == 100


def test_model_nowhere_is_not_found() -> None:
    with pytest.raises(ModelFileNotFound, match=r"ghost\.gguf in its models directory"):
        plan_load("ghost", [view("a", free=100, files={"m": 1})], evict=False)
    with pytest.raises(ModelFileNotFound):
        plan_load("ghost", [], evict=False)
    with pytest.raises(ModelFileNotFound, match=r"leave out the \.gguf: try 'm'") as named:  # not m.gguf.gguf
        plan_load("m.gguf", [view("a", free=100, files={"m": 1})], evict=False)
    assert ".gguf.gguf" not in named.value.message


def test_a_node_refusal_gets_the_pool_figures() -> None:
    error = InsufficientMemory("no room", needed_bytes=500, free_bytes=120, budget_bytes=1000)
    shaped = refused("m", "f" * 16, "gpu-1", error)
    assert shaped.details == {
        "needed_bytes": 500,
        "free_bytes": 120,
        "budget_bytes": 1000,
        "model": "m",
        "node": "f" * 16,
        "node_name": "gpu-1",
        "shortfall_bytes": 380,
    }
    assert "gpu-1" in shaped.message


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], ModelState.UNLOADED),
        ([ModelState.FAILED, ModelState.LOADED], ModelState.LOADED),
        ([ModelState.FAILED, ModelState.LOADING], ModelState.LOADING),
        ([ModelState.UNLOADING, ModelState.FAILED], ModelState.FAILED),
        ([ModelState.UNLOADING], ModelState.UNLOADED),
    ],
)
def test_pool_state(states: list[ModelState], expected: ModelState) -> None:
    assert pool_state(states) is expected


def test_model_entries_join_files_and_loaded_models_across_nodes() -> None:
    a = view("a", free=100, files={"m": 200, "n": 300}, models={"m": ModelState.LOADED})
    b = view("b", free=100, files={"m": 200}, models={"custom": ModelState.LOADED, "n": ModelState.FAILED})
    assert fleet_states([a, b]) == {"m": ModelState.LOADED, "n": ModelState.FAILED, "custom": ModelState.LOADED}
    entries = {e.id: e.model_dump(mode="json") for e in model_entries([a, b])}
    assert entries["m"]["nodes"] == [a.fingerprint, b.fingerprint] and entries["m"]["loaded_on"] == [a.fingerprint]
    assert entries["m"]["size_bytes"] == 190 and entries["m"]["estimate_bytes"] == 200
    assert entries["n"]["loaded_on"] == [] and entries["n"]["state"] == "failed"
    assert entries["custom"]["nodes"] == [] and entries["custom"]["loaded_on"] == [b.fingerprint]
    assert entries["custom"]["estimate_bytes"] is None and list(entries) == ["custom", "m", "n"]
