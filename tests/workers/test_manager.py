"""ModelManager's rules, built directly with a loader we control (STYLE: logic free of the transport)."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.errors import InsufficientMemory, ModelLoadFailed, ModelNotLoaded
from broker.schemas import ModelInfo, ModelState
from tests.conftest import wait_for
from workers.catalog import FilePlan
from workers.manager import ModelManager


@dataclass
class FakeModel:
    size_bytes: int
    context_length: int | None
    gpu_layers: int | None
    backend: str = "fake"


class GatedLoader:
    """Loads block until the test opens the gate, so the test sees every in-between state."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.gate = threading.Event()
        self.started = threading.Event()
        self.loads = 0
        self.unloads = 0
        self.checks = 0
        self.fail_with: Exception | None = None

    def load(
        self, path: Path, *, context_length: int | None, gpu_layers: int | None, backend: str | None = None
    ) -> FakeModel:
        self.loads += 1
        self.started.set()
        assert self.gate.wait(10)
        if self.fail_with:
            raise self.fail_with
        return FakeModel(self.size, context_length or 512, gpu_layers)

    def unload(self, model: FakeModel) -> None:
        self.unloads += 1

    def check(self, model: FakeModel) -> bool:
        self.checks += 1
        return True


def fake_plan(path: Path, context_length: int | None, backend: str | None = None) -> FilePlan:
    return FilePlan("fake", 0)


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
    assert first.model.context_length == 256
    assert second.already_loaded and loader.loads == 1
    checked = manager.wait_checked("m", timeout=5)
    assert checked is not None and checked.healthy and not checked.checking


def test_a_load_answers_before_its_first_check_which_runs_before_anything_else() -> None:
    """The check is one token's forward pass over every weight: the load's caller does not wait for it, but no
    generation runs on the model before it, and `model-checked` tells its answer."""
    loader = GatedLoader()
    loader.gate.set()
    checking = threading.Event()
    release = threading.Event()

    def check(model: object) -> bool:
        checking.set()
        return release.wait(5)

    loader.check = check  # type: ignore[method-assign]
    seen, hook = recorder()
    manager = ModelManager(loader, on_change=hook)
    outcome = manager.load("m", Path("/m.gguf"))
    assert outcome.model.state is ModelState.LOADED and outcome.model.checking and not outcome.model.healthy
    assert checking.wait(5)
    generation, box = in_thread(manager.acquire, "m")
    time.sleep(0.05)
    assert "value" not in box and manager.get("m").queued == 1  # type: ignore[union-attr]
    release.set()
    generation.join(5)
    box["value"].release()
    info = manager.get("m")
    assert info is not None and info.healthy and not info.checking
    assert [kind for kind, _, _ in seen] == ["model-loading", "model-loaded", "model-checked"]
    assert seen[-1][2] == [("m", "loaded")]


def held_check(loader: GatedLoader) -> tuple[threading.Event, threading.Event]:
    """Make the loader's check wait for the test: (the check has begun, let it end)."""
    begun, release = threading.Event(), threading.Event()

    def check(model: object) -> bool:
        begun.set()
        return release.wait(5)

    loader.check = check  # type: ignore[method-assign]
    return begun, release


@pytest.mark.parametrize("second", ["unload", "reload", "evict"])
def test_what_comes_during_the_first_check_waits_for_it_then_happens_once(second: str) -> None:
    """An unload meets another unload, a forced reload or an eviction while the model's first check runs: each
    waits for the check, then decides again, so the model is unloaded once, never freed twice."""
    loader = GatedLoader(size=100)
    loader.gate.set()
    seen, hook = recorder()
    manager = ModelManager(loader, memory_budget=100 if second == "evict" else 1000, on_change=hook)
    begun, release = held_check(loader)
    manager.load("m", Path("/m.gguf"), estimate_bytes=100)
    assert begun.wait(5)
    first, box1 = in_thread(manager.unload, "m")
    if second == "unload":
        other, box2 = in_thread(manager.unload, "m")
    elif second == "reload":
        other, box2 = in_thread(manager.load, "m", Path("/m.gguf"), estimate_bytes=100, force_reload=True)
    else:
        other, box2 = in_thread(manager.load, "n", Path("/n.gguf"), estimate_bytes=100, evict=True)
    time.sleep(0.1)
    assert "value" not in box1 and "error" not in box1  # both wait for the check
    release.set()
    first.join(5)
    other.join(5)
    assert not first.is_alive() and not other.is_alive()
    # Every copy loaded is either still listed or was freed exactly once: none freed twice, none leaked.
    assert loader.unloads + len(loaded_ids(manager)) == loader.loads, (seen, box1, box2)
    assert [kind for kind, _, _ in seen].count("model-unloaded") == loader.unloads
    if second == "evict":  # eviction may pick a model whose only use is its check (and waits for it)
        assert box2["value"].evicted == ("m",) and loaded_ids(manager) == ["n"]
    else:
        assert [kind for kind, _, _ in seen][:3] == ["model-loading", "model-loaded", "model-checked"]
    if second == "unload":  # one of them unloaded it, the other joined or found it gone
        errors = [box["error"] for box in (box1, box2) if "error" in box]
        assert all(isinstance(error, ModelNotLoaded) for error in errors) and len(errors) <= 1
    release.set()


def test_a_model_that_fails_its_first_check_is_loaded_but_not_healthy() -> None:
    loader = GatedLoader()
    loader.gate.set()
    loader.check = lambda model: False  # type: ignore[method-assign]
    seen, hook = recorder()
    manager = ModelManager(loader, on_change=hook)
    manager.load("m", Path("/m.gguf"))
    info = manager.wait_checked("m", timeout=5)
    assert info is not None and info.state is ModelState.LOADED and not info.healthy and not info.checking
    assert [kind for kind, _, _ in seen] == ["model-loading", "model-loaded", "model-checked"]


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


def recorder() -> tuple[list[tuple[str, str, list[tuple[str, str]]]], Callable[..., None]]:
    """A change hook that records (type, the model's state, every model's (id, state)) as the manager calls it."""
    seen: list[tuple[str, str, list[tuple[str, str]]]] = []

    def hook(kind: str, info: ModelInfo, models: list[ModelInfo]) -> None:
        seen.append((kind, info.state.value, [(m.id, m.state.value) for m in models]))

    return seen, hook


def test_events_in_order_with_the_models_after_each_change() -> None:
    loader = GatedLoader()
    loader.gate.set()
    seen, hook = recorder()
    manager = ModelManager(loader, on_change=hook)
    manager.load("m", Path("/m.gguf"))
    manager.unload("m")  # waits for the first check, so that it is announced first
    assert seen == [
        ("model-loading", "loading", [("m", "loading")]),
        ("model-loaded", "loaded", [("m", "loaded")]),
        ("model-checked", "loaded", [("m", "loaded")]),
        ("model-unloading", "unloading", [("m", "unloading")]),
        ("model-unloaded", "unloaded", []),
    ]


def test_an_unload_waiting_for_a_load_is_announced_after_it() -> None:
    """The hook runs before the load's waiters wake: the unload that waited cannot announce itself first."""
    loader = GatedLoader()
    seen, record = recorder()

    def slow_hook(kind: str, info: ModelInfo, models: list[ModelInfo]) -> None:
        record(kind, info, models)
        if kind == "model-loaded":
            time.sleep(0.05)  # a slow publisher: were the waiters woken first, the unload would announce meanwhile

    manager = ModelManager(loader, on_change=slow_hook)
    load, _ = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    unload, _ = in_thread(manager.unload, "m")
    # Only makes the test sharper (the unload is then surely waiting on the load); the order holds either way.
    time.sleep(0.05)
    loader.gate.set()
    load.join(5)
    unload.join(5)
    assert [kind for kind, _, _ in seen] == [
        "model-loading",
        "model-loaded",
        "model-checked",
        "model-unloading",
        "model-unloaded",
    ]


def test_a_failed_load_and_an_eviction_are_announced() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    seen, hook = recorder()
    manager = ModelManager(loader, memory_budget=100, on_change=hook)
    loader.fail_with = RuntimeError("bad file")
    with pytest.raises(ModelLoadFailed):
        manager.load("bad", Path("/bad.gguf"), estimate_bytes=100)
    assert seen == [
        ("model-loading", "loading", [("bad", "loading")]),
        ("model-load-failed", "failed", [("bad", "failed")]),  # listed as failed, holding no memory
    ]
    loader.fail_with = None
    manager.load("a", Path("/a.gguf"), estimate_bytes=100)
    manager.wait_checked("a", timeout=5)
    seen.clear()
    manager.load("b", Path("/b.gguf"), estimate_bytes=100, evict=True)
    manager.wait_checked("b", timeout=5)
    bad = ("bad", "failed")
    assert [(kind, model) for kind, _, model in seen] == [
        ("model-loading", [("a", "loaded"), ("b", "loading"), bad]),
        ("model-unloading", [("a", "unloading"), ("b", "loading"), bad]),
        ("model-unloaded", [("b", "loading"), bad]),
        ("model-loaded", [("b", "loaded"), bad]),
        ("model-checked", [("b", "loaded"), bad]),
    ]


def ticking_clock():  # type: ignore[no-untyped-def]
    """A clock that moves one second per reading, so every load and touch has its own time."""
    ticks = iter(range(1, 1_000_000))
    return lambda: float(next(ticks))


def loaded_ids(manager: ModelManager) -> list[str]:
    return [m.id for m in manager.models() if m.state is ModelState.LOADED]


def test_evict_unloads_least_recently_used_first() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=300, clock=ticking_clock())
    for name in ("a", "b", "c"):
        manager.load(name, Path(f"/{name}.gguf"), estimate_bytes=100)
    assert manager.load("a", Path("/a.gguf"), estimate_bytes=100).already_loaded  # a is now the most recent
    with pytest.raises(InsufficientMemory):
        manager.load("d", Path("/d.gguf"), estimate_bytes=100)
    outcome = manager.load("d", Path("/d.gguf"), estimate_bytes=100, evict=True)
    assert outcome.evicted == ("b",) and outcome.model.state is ModelState.LOADED
    assert loaded_ids(manager) == ["a", "c", "d"] and loader.unloads == 1
    two = manager.load("e", Path("/e.gguf"), estimate_bytes=200, evict=True)
    assert two.evicted == ("c", "a") and loaded_ids(manager) == ["d", "e"]


def test_pinned_models_are_never_evicted() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=300, clock=ticking_clock())
    manager.load("old", Path("/old.gguf"), estimate_bytes=100, pin=True)
    manager.load("b", Path("/b.gguf"), estimate_bytes=100)
    manager.load("c", Path("/c.gguf"), estimate_bytes=100)
    manager.load("c", Path("/c.gguf"), estimate_bytes=100, pin=True)  # pinning a loaded model
    assert manager.memory().evictable_bytes == 100
    assert manager.load("d", Path("/d.gguf"), estimate_bytes=100, evict=True).evicted == ("b",)
    assert {m.id: m.pinned for m in manager.models()} == {"old": True, "c": True, "d": False}


def test_evict_that_cannot_make_room_evicts_nothing() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=300, clock=ticking_clock())
    manager.load("pinned", Path("/p.gguf"), estimate_bytes=100, pin=True)
    manager.load("a", Path("/a.gguf"), estimate_bytes=100)
    with pytest.raises(InsufficientMemory) as info:
        manager.load("big", Path("/big.gguf"), estimate_bytes=250, evict=True)
    assert info.value.details == {"needed_bytes": 250, "free_bytes": 100, "budget_bytes": 300, "evictable_bytes": 100}
    assert loaded_ids(manager) == ["a", "pinned"] and loader.unloads == 0 and loader.loads == 2


def test_loading_models_are_never_evicted() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=300, clock=ticking_clock())
    manager.load("done", Path("/done.gguf"), estimate_bytes=100)
    loader.gate.clear()
    thread, box = in_thread(manager.load, "slow", Path("/slow.gguf"), estimate_bytes=100)
    assert loader.started.wait(5)
    with pytest.raises(InsufficientMemory):  # only "done" may go: 100 free + 100 is not 300
        manager.load("big", Path("/big.gguf"), estimate_bytes=300, evict=True)
    assert {m.id: m.state for m in manager.models()} == {"done": ModelState.LOADED, "slow": ModelState.LOADING}
    loader.gate.set()
    outcome = manager.load("fits", Path("/fits.gguf"), estimate_bytes=200, evict=True)
    thread.join(5)
    assert outcome.evicted == ("done",) and box["value"].model.state is ModelState.LOADED


def test_concurrent_evicting_loads_cannot_share_the_same_room() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=200, clock=ticking_clock())
    manager.load("a", Path("/a.gguf"), estimate_bytes=100)
    manager.load("b", Path("/b.gguf"), estimate_bytes=100)
    loader.gate.clear()
    loader.started.clear()
    thread, box = in_thread(manager.load, "c", Path("/c.gguf"), estimate_bytes=200, evict=True)
    assert loader.started.wait(5)  # c's admission is done: a and b are marked for eviction, c holds the room
    with pytest.raises(InsufficientMemory):
        manager.load("d", Path("/d.gguf"), estimate_bytes=200, evict=True)
    loader.gate.set()
    thread.join(5)
    assert box["value"].evicted == ("a", "b") and loaded_ids(manager) == ["c"]
    assert manager.memory().used_bytes == 200


def test_force_reload_loads_afresh_and_keeps_the_pin() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=300, clock=ticking_clock())
    first = manager.load("m", Path("/m.gguf"), estimate_bytes=100, pin=True)
    again = manager.load("m", Path("/m.gguf"), estimate_bytes=100, force_reload=True)
    assert not again.already_loaded and loader.loads == 2 and loader.unloads == 1
    assert again.model.loaded_at is not None and first.model.loaded_at is not None
    assert again.model.loaded_at > first.model.loaded_at and again.model.pinned
    assert manager.memory().used_bytes == 100


def test_force_reload_that_does_not_fit_keeps_the_loaded_copy() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=250, clock=ticking_clock())
    manager.load("m", Path("/m.gguf"), estimate_bytes=100)
    manager.load("other", Path("/o.gguf"), estimate_bytes=100)
    with pytest.raises(InsufficientMemory) as info:
        manager.load("m", Path("/m.gguf"), estimate_bytes=200, force_reload=True)
    assert info.value.details["free_bytes"] == 150  # its own copy counts as free for its reload
    assert loaded_ids(manager) == ["m", "other"] and loader.unloads == 0


def test_memory_report() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=1000)
    manager.load("a", Path("/a.gguf"), estimate_bytes=120)
    manager.load("p", Path("/p.gguf"), estimate_bytes=100, pin=True)
    memory = manager.memory()
    assert (memory.budget_bytes, memory.used_bytes, memory.free_bytes, memory.evictable_bytes) == (1000, 220, 780, 120)
    unlimited = ModelManager(loader).memory()
    assert unlimited.budget_bytes is None and unlimited.free_bytes is None


def test_heartbeat_stats_count_models_by_state() -> None:
    loader = GatedLoader(size=100)
    manager = ModelManager(loader, memory_budget=1000)
    loader.gate.set()
    manager.load("a", Path("/a.gguf"), estimate_bytes=100)
    loader.gate.clear()
    thread, _ = in_thread(manager.load, "slow", Path("/slow.gguf"), estimate_bytes=100)
    assert loader.started.wait(5)
    stats = manager.stats()
    assert stats["modelsLoaded"] == 1 and stats["memoryBudgetBytes"] == 1000
    assert stats["modelStates"] == {"loading": 1, "loaded": 1, "unloading": 0, "unloaded": 0, "failed": 0}
    loader.gate.set()
    thread.join(5)


def test_a_load_joined_through_the_service_holds_no_thread(tmp_path: Path) -> None:
    from broker.schemas import LoadJob, LoadResult
    from workers.service import NodeService

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    loader = GatedLoader()
    service = NodeService(
        fingerprint="f" * 32,
        models_dir=tmp_path,
        manager=ModelManager(loader),
        plan=fake_plan,
    )
    job = LoadJob(deadline=1e12, model_id="m")
    assert service.join_load(job) is None  # nothing in flight: run the load itself
    first, box = in_thread(service.load, job)
    assert loader.started.wait(5)
    joined = service.join_load(job)
    assert joined is not None and not joined.done()  # returned at once, while the load runs
    assert service.join_load(LoadJob(deadline=1e12, model_id="m", force_reload=True)) is None
    loader.gate.set()
    first.join(5)
    result = joined.result(5)
    assert isinstance(result, LoadResult) and result == box["value"] and loader.loads == 1
    assert service.join_load(job) is None  # loaded now: a load answers already_loaded itself


def test_a_joined_load_shares_the_failure() -> None:
    loader = GatedLoader()
    loader.fail_with = RuntimeError("bad tensor")
    manager = ModelManager(loader)
    thread, _ = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    loading = manager.loading("m")
    assert loading is not None
    loader.gate.set()
    thread.join(5)
    with pytest.raises(ModelLoadFailed, match="bad tensor"):
        loading.result(5)


def test_unload_waiting_for_a_load_gives_up_at_its_deadline_and_changes_nothing() -> None:
    import time

    from broker.errors import JobTimeout

    loader = GatedLoader()
    manager = ModelManager(loader)
    thread, _ = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    with pytest.raises(JobTimeout, match="still loading"):
        manager.unload("m", deadline=time.time() + 0.2)
    loader.gate.set()
    thread.join(5)
    assert [m.state for m in manager.models()] == [ModelState.LOADED]
    assert loader.unloads == 0


def test_a_joiners_pin_is_kept() -> None:
    loader = GatedLoader()
    manager = ModelManager(loader)
    first, _ = in_thread(manager.load, "m", Path("/m.gguf"))
    assert loader.started.wait(5)
    second, _ = in_thread(manager.load, "m", Path("/m.gguf"), pin=True)
    loader.gate.set()
    first.join(5)
    second.join(5)
    assert manager.models()[0].pinned


def test_the_load_task_answers_a_joined_job_when_the_load_ends(tmp_path: Path) -> None:
    """workers.tasks with our own Redis code on fakeredis: the joined job returns at once, its reply follows."""
    from collections.abc import Iterator
    from contextlib import contextmanager
    from types import SimpleNamespace

    import fakeredis
    from celery.exceptions import Ignore

    from broker import keys
    from broker.operations import LOAD
    from broker.schemas import Reply
    from workers import tasks
    from workers.outbox import ReplyOutbox
    from workers.service import NodeService

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    loader = GatedLoader()
    service = NodeService(
        fingerprint="f" * 32,
        models_dir=tmp_path,
        manager=ModelManager(loader),
        plan=fake_plan,
    )
    redis = fakeredis.FakeRedis()
    runtime = SimpleNamespace(
        redis=redis,
        fingerprint="f" * 32,
        boot_id="b" * 32,
        service=service,
        settings=SimpleNamespace(reply_ttl=60),
        outbox=ReplyOutbox(redis, ttl=60),
        events=SimpleNamespace(flush=lambda timeout: True),  # the manager here has no change hook
    )
    tasks.install(runtime)  # type: ignore[arg-type]

    sent: list[tuple[str, dict[str, object]]] = []

    @contextmanager
    def default_dispatcher(hostname: str) -> Iterator[SimpleNamespace]:
        assert hostname == "n@h"
        yield SimpleNamespace(send=lambda kind, **fields: sent.append((kind, fields)))

    celery = SimpleNamespace(events=SimpleNamespace(default_dispatcher=default_dispatcher))

    def run(job_id: str) -> dict[str, object]:
        request = SimpleNamespace(id=job_id, hostname="n@h")
        task = SimpleNamespace(request=request, name="modelfleet.load", app=celery)
        job = {"deadline": 1e12, "modelId": "m"}
        handle, join = tasks.HANDLERS[LOAD]
        return tasks._run(task, LOAD, job, handle, join)  # type: ignore[arg-type]

    try:
        first, box = in_thread(run, "job-1")
        assert loader.started.wait(5)
        with pytest.raises(Ignore):  # no Celery state until the joined load ends
            run("job-2")
        assert redis.get(keys.reply("job-2")) is None and sent == []  # not answered before the load ends
        loader.gate.set()
        first.join(5)
        assert box["value"]["ok"] is True
        # The joined job's end goes to Celery's event stream (Flower) from the loading thread.
        assert [(kind, fields["uuid"]) for kind, fields in sent] == [("task-succeeded", "job-2")]
        replies = [Reply[LOAD.result].model_validate_json(redis.get(keys.reply(j)) or b"") for j in ("job-1", "job-2")]
        assert [r.error for r in replies] == [None, None]
        assert replies[0].result == replies[1].result and loader.loads == 1
    finally:
        tasks.install(None)  # type: ignore[arg-type]


class Probe:
    """A memory reading the test sets: what the process holds before and after a load."""

    def __init__(self) -> None:
        self.value = 1000

    def __call__(self) -> int:
        return self.value


class GrowingLoader(GatedLoader):
    """Loads that make the probe's memory grow by `grows` bytes, as a real load grows RSS."""

    def __init__(self, probe: Probe, grows: int) -> None:
        super().__init__(size=100)
        self.probe, self.grows = probe, grows

    def load(
        self, path: Path, *, context_length: int | None, gpu_layers: int | None, backend: str | None = None
    ) -> FakeModel:
        model = super().load(path, context_length=context_length, gpu_layers=gpu_layers)
        self.probe.value += self.grows
        return model


def test_a_load_that_ran_alone_is_measured_and_its_reservation_corrected_upwards() -> None:
    probe = Probe()
    loader = GrowingLoader(probe, grows=700)
    loader.gate.set()
    manager = ModelManager(loader, memory_budget=10_000, memory_probe=probe)
    big = manager.load("big", Path("/big.gguf"), estimate_bytes=500).model
    assert big.measured_bytes == 700 and manager.stats()["memoryUsedBytes"] == 700
    small = manager.load("small", Path("/small.gguf"), estimate_bytes=900).model
    assert small.measured_bytes == 700 and manager.stats()["memoryUsedBytes"] == 700 + 900


def test_overlapping_loads_are_not_measured() -> None:
    probe = Probe()
    loader = GrowingLoader(probe, grows=700)
    manager = ModelManager(loader, memory_probe=probe)
    first, _ = in_thread(manager.load, "a", Path("/a.gguf"), estimate_bytes=10)
    assert loader.started.wait(5)
    second, _ = in_thread(manager.load, "b", Path("/b.gguf"), estimate_bytes=10)
    wait_for(lambda: loader.loads == 2, 5, "the second load to reach the loader")
    loader.gate.set()
    first.join(5)
    second.join(5)
    assert [m.measured_bytes for m in manager.models()] == [None, None]


def test_a_forced_reload_announces_the_old_copy_gone_before_the_new_one_loading() -> None:
    loader = GatedLoader()
    loader.gate.set()
    seen, hook = recorder()
    manager = ModelManager(loader, on_change=hook)
    manager.load("m", Path("/m.gguf"))
    manager.wait_checked("m", timeout=5)
    seen.clear()
    manager.load("m", Path("/m.gguf"), force_reload=True)
    manager.wait_checked("m", timeout=5)
    kinds = ["model-unloading", "model-unloaded", "model-loading", "model-loaded", "model-checked"]
    assert [kind for kind, _, _ in seen] == kinds
    assert seen[-1][2] == [("m", "loaded")]
