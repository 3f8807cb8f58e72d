"""ModelManager's generation rules: one at a time per model, a bounded queue, unload waits, idle TTL.

Built directly with a loader we control (STYLE: logic free of the transport); leases stand for generations.
"""

import threading
import time
from pathlib import Path

import pytest

from broker.errors import ModelBusy, ModelNotLoaded, ShuttingDown
from broker.schemas import ModelInfo, ModelState
from tests.conftest import wait_for
from tests.workers.test_manager import GatedLoader, in_thread
from workers.manager import GenerationCancelled, ModelManager


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def loaded(manager: ModelManager, *ids: str, **kwargs: object) -> ModelManager:
    for model_id in ids:
        manager.load(model_id, Path(f"/{model_id}.gguf"), **kwargs)  # type: ignore[arg-type]
    return manager


@pytest.fixture
def loader() -> GatedLoader:
    gated = GatedLoader()
    gated.gate.set()
    return gated


def test_one_generation_at_a_time_then_the_queue_then_busy(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader, max_queue=1), "m")
    first = manager.acquire("m")
    t, box = in_thread(manager.acquire, "m")
    wait_for(lambda: manager.get("m").queued == 1, 5, "a queued generation")  # type: ignore[union-attr]
    with pytest.raises(ModelBusy) as busy:
        manager.acquire("m")
    assert busy.value.details["retry_after"] >= 1
    info = manager.get("m")
    assert info is not None and info.in_flight == 1 and info.queued == 1
    first.tokens = 5
    assert manager.get("m").tokens_generated == 5  # type: ignore[union-attr]  # counted while it runs
    first.release()
    t.join(5)
    second = box["value"]
    info = manager.get("m")
    assert info is not None and info.in_flight == 1 and info.queued == 0 and info.tokens_generated == 5
    second.release()  # type: ignore[attr-defined]
    assert manager.get("m").in_flight == 0  # type: ignore[union-attr]


def test_a_queued_caller_that_leaves_gives_up_its_place(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader), "m")
    running = manager.acquire("m")
    left = threading.Event()
    t, box = in_thread(manager.acquire, "m", cancelled=left)
    wait_for(lambda: manager.get("m").queued == 1, 5, "a queued generation")  # type: ignore[union-attr]
    left.set()
    manager.wake()
    t.join(5)
    assert isinstance(box["error"], GenerationCancelled)
    assert manager.get("m").queued == 0  # type: ignore[union-attr]
    running.release()


def test_use_refreshes_last_use_and_only_idle_models_are_evicted() -> None:
    loader = GatedLoader(size=100)
    loader.gate.set()
    clock = Clock()
    manager = ModelManager(loader, memory_budget=200, clock=clock)
    loaded(manager, "old")
    clock.now += 10
    loaded(manager, "new")
    clock.now += 10
    with manager.acquire("old") as lease:  # "old" is now the most recently used, and busy
        lease.tokens = 1
        with pytest.raises(Exception, match="needs about"):
            manager.load("third", Path("/third.gguf"), estimate_bytes=150, evict=True)  # both are needed
        outcome = manager.load("third", Path("/third.gguf"), estimate_bytes=100, evict=True)
    assert outcome.evicted == ("new",)
    assert manager.get("old").last_used is not None  # type: ignore[union-attr]


def test_unload_waits_for_the_running_generation_and_refuses_new_ones(loader: GatedLoader) -> None:
    events: list[tuple[str, ModelInfo]] = []
    manager = ModelManager(loader, on_change=lambda kind, info, models: events.append((kind, info)))
    loaded(manager, "m")
    lease = manager.acquire("m")
    queued_t, queued = in_thread(manager.acquire, "m")
    wait_for(lambda: manager.get("m").queued == 1, 5, "a queued generation")  # type: ignore[union-attr]
    t, box = in_thread(manager.unload, "m", deadline=time.time() + 30)
    wait_for(lambda: manager.get("m").state is ModelState.UNLOADING, 5, "unloading")  # type: ignore[union-attr]
    queued_t.join(5)
    assert isinstance(queued["error"], ModelNotLoaded) and "being unloaded" in queued["error"].message
    with pytest.raises(ModelNotLoaded, match="being unloaded"):
        manager.acquire("m")
    assert loader.unloads == 0 and t.is_alive() and not lease.stopped  # never freed under a generation
    lease.release()
    t.join(5)
    assert box["value"].state is ModelState.UNLOADED and loader.unloads == 1  # type: ignore[attr-defined]
    assert [k for k, _ in events][-2:] == ["model-unloading", "model-unloaded"]
    assert events[-1][1].unload_reason == "requested"


def test_at_the_unload_deadline_the_generation_is_stopped_then_the_model_freed(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader), "m")
    lease = manager.acquire("m")
    t, box = in_thread(manager.unload, "m", deadline=time.time() + 1.2)  # drains until 0.2 s from now
    wait_for(lambda: lease.stopped, 5, "the generation to be told to stop")
    assert loader.unloads == 0 and t.is_alive()  # still running: not freed yet
    lease.release()  # the generation notices within one token
    t.join(5)
    assert loader.unloads == 1 and box["value"].state is ModelState.UNLOADED  # type: ignore[attr-defined]


def test_force_reload_waits_for_generations_on_the_old_copy(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader), "m")
    lease = manager.acquire("m")
    old_model = lease.model
    t, box = in_thread(manager.load, "m", Path("/m.gguf"), force_reload=True, deadline=time.time() + 30)
    wait_for(lambda: manager.get("m").state is ModelState.LOADING, 5, "the reload to begin")  # type: ignore[union-attr]
    with pytest.raises(ModelNotLoaded, match="still loading"):
        manager.acquire("m")
    assert loader.unloads == 0 and lease.model is old_model
    lease.release()
    t.join(5)
    assert box["value"].model.state is ModelState.LOADED and loader.unloads == 1  # type: ignore[attr-defined]


def test_an_idle_model_unloads_after_its_keep_alive(loader: GatedLoader) -> None:
    clock = Clock()
    reasons: list[object] = []
    manager = ModelManager(
        loader, clock=clock, on_change=lambda kind, info, _: reasons.append((kind, info.unload_reason))
    )
    manager.load("short", Path("/s.gguf"), keep_alive=60)
    manager.load("forever", Path("/f.gguf"))
    assert manager.get("short").keep_alive == 60 and manager.get("forever").keep_alive is None  # type: ignore[union-attr]
    clock.now += 59
    assert manager.reap_idle() == []
    with manager.acquire("short") as lease:  # a use restarts the clock, and a busy model is never reaped
        clock.now += 120
        assert manager.reap_idle() == []
        lease.tokens = 1
    clock.now += 61
    assert manager.reap_idle() == ["short"]
    assert manager.get("short") is None and manager.get("forever") is not None
    assert ("model-unloaded", "idle") in reasons


def test_a_model_whose_file_is_written_over_is_served_no_more_and_unloaded(loader: GatedLoader, tmp_path: Path) -> None:
    """Its weights are mapped from the file: `cp` over a loaded model cut the pages off, and the next read of them
    (its health check) killed the node with SIGBUS. A file replaced by a rename leaves the model its own."""
    reasons: list[object] = []
    manager = ModelManager(loader, on_change=lambda kind, info, _: reasons.append((kind, info.unload_reason)))
    for name in ("copied", "renamed"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF" + bytes(1000))
        manager.load(name, tmp_path / f"{name}.gguf")
    wait_for(lambda: not manager.get("copied").checking, 5, "the first checks")  # type: ignore[union-attr]
    (tmp_path / "new.gguf").write_bytes(b"GGUF" + bytes(10))
    (tmp_path / "new.gguf").replace(tmp_path / "renamed.gguf")
    with open(tmp_path / "copied.gguf", "wb") as file:  # what cp does: the same inode, truncated and written
        file.write(b"GGUF" + bytes(10))
    with pytest.raises(ModelNotLoaded, match="written over on disk"):
        manager.acquire("copied")
    manager.acquire("renamed").release()
    checks = loader.checks
    manager.check_health()
    assert loader.checks == checks + 1, "only the renamed one is checked: the other's pages are not read"
    assert manager.reap_idle() == ["copied"]
    assert manager.get("copied") is None and ("model-unloaded", "file-changed") in reasons
    assert manager.get("renamed") is not None


def test_closing_stops_running_generations_and_sends_queued_and_new_ones_away(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader), "m")
    running = manager.acquire("m")
    queued, box = in_thread(manager.acquire, "m")
    wait_for(lambda: manager.get("m").queued == 1, 5, "the second to queue")  # type: ignore[union-attr]
    manager.close()
    queued.join(5)
    assert isinstance(box.get("error"), ShuttingDown)
    assert running.stopped, "a running generation is told to stop (it ends within one token)"
    running.release()
    with pytest.raises(ShuttingDown):
        manager.acquire("m")


def test_the_node_default_keep_alive_and_zero_for_never(loader: GatedLoader) -> None:
    manager = ModelManager(loader, keep_alive=300)
    manager.load("a", Path("/a.gguf"))
    manager.load("b", Path("/b.gguf"), keep_alive=0)
    assert manager.get("a").keep_alive == 300 and manager.get("b").keep_alive is None  # type: ignore[union-attr]


def test_health_checks_never_run_beside_a_generation(loader: GatedLoader) -> None:
    manager = loaded(ModelManager(loader), "m")
    checks = []
    loader.check = lambda model: checks.append(model) or False  # type: ignore[method-assign]
    with manager.acquire("m"):
        manager.check_health()
        assert checks == [] and manager.get("m").healthy  # type: ignore[union-attr]
    manager.check_health()
    assert len(checks) == 1 and not manager.get("m").healthy  # type: ignore[union-attr]


def test_a_recent_generation_stands_for_a_health_check(loader: GatedLoader) -> None:
    clock = Clock()
    manager = loaded(ModelManager(loader, clock=clock), "m")
    checks: list[object] = []
    loader.check = lambda model: checks.append(model) or True  # type: ignore[method-assign]
    with manager.acquire("m") as lease:
        lease.tokens = 1
    manager.check_health(fresh_within=10)
    assert checks == []
    clock.now += 11
    manager.check_health(fresh_within=10)
    assert len(checks) == 1
