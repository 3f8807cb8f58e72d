"""ModelManager's rules, built directly with a loader we control (STYLE: logic free of the transport)."""

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.errors import InsufficientMemory, ModelLoadFailed, ModelNotLoaded
from broker.schemas import ModelState
from workers.manager import ModelManager


@dataclass
class FakeModel:
    size_bytes: int
    context_length: int | None
    gpu_layers: int | None


class GatedLoader:
    """Loads block until the test opens the gate, so the test sees every in-between state."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.gate = threading.Event()
        self.started = threading.Event()
        self.loads = 0
        self.unloads = 0
        self.fail_with: Exception | None = None

    def load(self, path: Path, *, context_length: int | None, gpu_layers: int | None) -> FakeModel:
        self.loads += 1
        self.started.set()
        assert self.gate.wait(10)
        if self.fail_with:
            raise self.fail_with
        return FakeModel(self.size, context_length or 512, gpu_layers)

    def unload(self, model: FakeModel) -> None:
        self.unloads += 1

    def check(self, model: FakeModel) -> bool:
        return True


def in_thread(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_load_then_already_loaded() -> None:
    loader = GatedLoader()
    loader.gate.set()
    manager = ModelManager(loader)
    first = manager.load("m", Path("/m.gguf"), context_length=256)
    second = manager.load("m", Path("/m.gguf"))
    assert not first.already_loaded and first.model.state is ModelState.LOADED
    assert first.model.context_length == 256 and first.model.healthy
    assert second.already_loaded and loader.loads == 1


def test_concurrent_loads_join_one_load() -> None:
    loader = GatedLoader()
    manager = ModelManager(loader)
    t1, r1 = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    t2, r2 = in_thread(manager.load, "m", Path("/m.gguf"))
    assert [m.state for m in manager.models()] == [ModelState.LOADING]
    loader.gate.set()
    t1.join(5)
    t2.join(5)
    assert loader.loads == 1
    assert r1["value"] == r2["value"]


def test_joined_load_shares_failure() -> None:
    loader = GatedLoader()
    loader.fail_with = RuntimeError("bad tensor")
    manager = ModelManager(loader)
    t1, r1 = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    t2, r2 = in_thread(manager.load, "m", Path("/m.gguf"))
    loader.gate.set()
    t1.join(5)
    t2.join(5)
    assert isinstance(r1["error"], ModelLoadFailed) and isinstance(r2["error"], ModelLoadFailed)
    assert "bad tensor" in r1["error"].message
    [record] = manager.models()
    assert record.state is ModelState.FAILED and "bad tensor" in (record.error or "")
    assert loader.loads == 1


def test_failed_model_can_be_loaded_again() -> None:
    loader = GatedLoader()
    loader.fail_with = RuntimeError("once")
    loader.gate.set()
    manager = ModelManager(loader)
    with pytest.raises(ModelLoadFailed):
        manager.load("m", Path("/m.gguf"))
    loader.fail_with = None
    assert manager.load("m", Path("/m.gguf")).model.state is ModelState.LOADED


def test_list_answers_during_a_load() -> None:
    loader = GatedLoader()
    manager = ModelManager(loader)
    thread, _ = in_thread(manager.load, "slow", Path("/slow.gguf"))
    assert loader.started.wait(5)
    listed, _ = in_thread(manager.models)
    listed.join(2)
    assert not listed.is_alive(), "models() waited on a loading model"
    loader.gate.set()
    thread.join(5)


def test_unload_of_loading_model_waits_then_unloads() -> None:
    loader = GatedLoader()
    manager = ModelManager(loader)
    t1, _ = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    t2, r2 = in_thread(manager.unload, "m")
    t2.join(0.3)
    assert t2.is_alive(), "unload did not wait for the load"
    loader.gate.set()
    t1.join(5)
    t2.join(5)
    assert r2["value"].state is ModelState.UNLOADED
    assert manager.models() == [] and loader.unloads == 1


def test_unload_unknown_and_failed() -> None:
    loader = GatedLoader()
    loader.gate.set()
    manager = ModelManager(loader)
    with pytest.raises(ModelNotLoaded):
        manager.unload("nope")
    loader.fail_with = RuntimeError("x")
    with pytest.raises(ModelLoadFailed):
        manager.load("m", Path("/m.gguf"))
    with pytest.raises(ModelNotLoaded, match="last load failed"):
        manager.unload("m")


def test_unload_all_clears_everything() -> None:
    loader = GatedLoader()
    loader.gate.set()
    manager = ModelManager(loader)
    for name in ("a", "b", "c"):
        manager.load(name, Path(f"/{name}.gguf"))
    unloaded, failures = manager.unload_all()
    assert sorted(unloaded) == ["a", "b", "c"] and failures == []
    assert manager.models() == [] and manager.stats()["memoryUsedBytes"] == 0


def test_admission_reserves_before_loading() -> None:
    loader = GatedLoader(size=600)
    manager = ModelManager(loader, memory_budget=1000)
    t1, r1 = in_thread(manager.load, "a", Path("/a.gguf"), estimate_bytes=600)
    assert loader.started.wait(5)
    with pytest.raises(InsufficientMemory) as info:
        manager.load("b", Path("/b.gguf"), estimate_bytes=600)
    assert info.value.details == {"needed_bytes": 600, "free_bytes": 400, "budget_bytes": 1000}
    loader.gate.set()
    t1.join(5)
    assert r1["value"].model.state is ModelState.LOADED
    manager.unload("a")
    assert manager.load("b", Path("/b.gguf"), estimate_bytes=600).model.state is ModelState.LOADED


def test_events_in_order() -> None:
    loader = GatedLoader()
    loader.gate.set()
    seen: list[tuple[str, str]] = []
    manager = ModelManager(loader, on_change=lambda kind, info: seen.append((kind, info.state.value)))
    manager.load("m", Path("/m.gguf"))
    manager.unload("m")
    assert seen == [
        ("model-loading", "loading"),
        ("model-loaded", "loaded"),
        ("model-unloading", "unloading"),
        ("model-unloaded", "unloaded"),
    ]
