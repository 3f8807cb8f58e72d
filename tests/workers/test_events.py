"""NodeEvents: a node's events go out in queue order from one thread, whatever a publish raises."""

import threading
from datetime import UTC, datetime
from typing import Any

import redis

from broker.schemas import ModelInfo, ModelState
from tests.conftest import node_info, wait_for
from workers.events import NodeEvents


class FakeBus:
    """Records what is published; raises what the test queues up for the next calls."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []
        self.failures: list[Exception] = []
        self.lock = threading.Lock()

    def publish(self, event: Any, *, models: Any = None, mode: str = "always", boot: str = "") -> str | None:
        with self.lock:
            if self.failures:
                raise self.failures.pop(0)
            self.published.append((event.type, mode))
        return "1-0"


def model(state: ModelState = ModelState.LOADED) -> ModelInfo:
    return ModelInfo(id="m", path="/m.gguf", healthy=True, state=state, size_bytes=1, loaded_at=datetime.now(UTC))


def test_passing_errors_are_retried_in_order_and_others_drop_only_their_event() -> None:
    bus = FakeBus()
    events = NodeEvents(bus, node_info())  # type: ignore[arg-type]
    bus.failures = [redis.ConnectionError("down"), redis.ConnectionError("still down")]
    events.model_changed("model-loading", model(ModelState.LOADING), [])
    events.model_changed("model-loaded", model(), [])
    wait_for(lambda: len(bus.published) == 2, 10, "the retried events")
    assert bus.published == [("model-loading", "always"), ("model-loaded", "always")]

    bus.failures = [redis.ResponseError("WRONGTYPE"), TypeError("a bug")]
    events.model_changed("model-unloading", model(ModelState.UNLOADING), [])
    events.model_changed("model-unloaded", model(ModelState.UNLOADED), [])
    events.stopped()
    events.close()
    assert bus.published[2:] == [("node-offline", "stopped")]  # the two that could never go out were dropped


def test_online_is_queued_once_at_a_time_and_again_after_it_went_out() -> None:
    bus = FakeBus()
    events = NodeEvents(bus, node_info())  # type: ignore[arg-type]
    gate = threading.Event()
    events.with_models = lambda action: (gate.wait(5), action([]))  # type: ignore[assignment, func-returns-value]
    starter = threading.Thread(target=events.online)
    starter.start()
    events.online()  # while the first check is being queued: not queued twice
    gate.set()
    starter.join(5)
    wait_for(lambda: ("node-online", "online") in bus.published, 5, "the online check")
    events.online()
    events.close()
    assert bus.published.count(("node-online", "online")) == 2
    assert bus.published.count(("node-offline", "replaced")) == 2


def test_flush_waits_for_what_was_queued_and_after_models_follows_each_models_item() -> None:
    bus = FakeBus()
    events = NodeEvents(bus, node_info())  # type: ignore[arg-type]
    seen: list[int] = []
    events.after_models = lambda: seen.append(len(bus.published))
    bus.failures = [redis.ConnectionError("down")]
    events.model_changed("model-loading", model(ModelState.LOADING), [])
    events.model_changed("model-loaded", model(), [])
    assert events.flush(10)
    assert bus.published == [("model-loading", "always"), ("model-loaded", "always")]
    assert seen == [1, 2], "after each publish that carried the models, in order"
    events.close()
