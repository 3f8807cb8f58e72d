"""Usage updates: the throttle's rule, its thread, the manager's marks and their place in the node's event queue.

The rule runs on a clock the test moves; the thread and the queue are the real ones. Redis and the relay are in
tests/broker/test_events.py and tests/e2e/test_events.py."""

import threading
from pathlib import Path
from typing import Any

from broker.events import UsageEvent
from broker.schemas import ModelInfo, ModelState
from tests.conftest import node_info, wait_for
from tests.workers.test_events import FakeBus
from tests.workers.test_manager import GatedLoader, in_thread
from workers.events import NodeEvents
from workers.manager import ModelManager
from workers.usage import Throttle, UsageThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_a_burst_makes_one_update_an_interval_and_a_final_one() -> None:
    rule = Throttle(1.0)
    sent = []
    for tenth in range(30):  # a change every tenth of a second for three seconds
        now = tenth / 10
        rule.mark()
        if rule.take(now):
            sent.append(now)
    assert sent == [0.0, 1.0, 2.0]
    assert rule.pending and rule.wait(2.9) is not None and rule.wait(2.9) > 0  # type: ignore[operator]
    assert not rule.take(2.95)
    assert rule.take(3.0), "the final one, after the last change"
    assert rule.wait(3.0) is None and not rule.take(10.0), "nothing while idle"


def test_a_change_after_a_quiet_stretch_goes_out_at_once() -> None:
    rule = Throttle(1.0)
    assert not rule.take(0.0) and rule.wait(0.0) is None, "nothing before any change"
    rule.mark()
    assert rule.take(50.0)
    rule.mark()
    assert rule.take(60.0), "the interval has long passed: no wait"


def test_the_thread_sends_one_update_for_many_changes_and_goes_on_while_busy() -> None:
    clock = Clock()
    busy = threading.Event()
    sent: list[float] = []

    def publish() -> bool:
        still_busy = busy.is_set()  # read before the append the test waits on: clearing it after counts next time
        sent.append(clock())
        return still_busy

    throttle = UsageThrottle(publish, interval=1.0, clock=clock)
    try:
        throttle.changed()
        wait_for(lambda: len(sent) == 1, 5, "the first update")
        for _ in range(20):
            throttle.changed()  # within the interval: held back, not dropped
        clock.advance(1.0)
        throttle.changed()
        wait_for(lambda: len(sent) == 2, 5, "one update for the 21 changes")
        assert sent == [100.0, 101.0]

        # A generation runs (tokens keep coming, with no mark): each interval sends one more, the one after it
        # ends shows it idle, and then nothing.
        busy.set()
        clock.advance(1.0)
        throttle.changed()
        wait_for(lambda: len(sent) == 3, 5, "the update that sees it busy")
        clock.advance(1.0)
        wait_for(lambda: len(sent) == 4, 5, "the next interval's, without a mark")
        busy.clear()
        clock.advance(1.0)
        wait_for(lambda: len(sent) == 5, 5, "the one after the end")
        clock.advance(5.0)
        throttle.changed()
        wait_for(lambda: len(sent) == 6, 5, "a later change")
    finally:
        throttle.close()
    assert sent == [100.0, 101.0, 102.0, 103.0, 104.0, 109.0]


class UsageBus(FakeBus):
    """Also records usage updates, with the models each one writes to the node's hash."""

    def __init__(self) -> None:
        super().__init__()
        self.usage: list[tuple[UsageEvent, list[ModelInfo]]] = []

    def publish_usage(self, event: UsageEvent, *, models: list[ModelInfo], boot: str) -> bool:
        with self.lock:
            self.published.append((event.type, "usage"))
            self.usage.append((event, models))
        return True


def model(in_flight: int = 0) -> ModelInfo:
    return ModelInfo(id="m", path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1, in_flight=in_flight)


def test_usage_updates_queue_behind_pool_events_with_the_models_they_were_read_with() -> None:
    bus = UsageBus()
    events = NodeEvents(bus, node_info(), usage_interval=0.05)  # type: ignore[arg-type]
    now = [model(in_flight=1)]
    lock = threading.Lock()

    def with_models(action: Any) -> None:
        with lock:
            action(list(now))

    events.with_models = with_models
    events.model_changed("model-loaded", model(), [model()])
    events.usage_changed()
    wait_for(lambda: bus.usage, 5, "a usage update")
    with lock:
        now[:] = [model(in_flight=0)]  # the generation ended; nothing marks it: the busy update's follow-up sees it
    wait_for(lambda: bus.usage and bus.usage[-1][0].models[0].in_flight == 0, 5, "the update that shows it idle")
    assert events.flush(5)
    events.close()
    assert bus.published[0] == ("model-loaded", "always")
    assert set(bus.published[1:]) == {("model-usage", "usage")}, "usage never goes out as a pool event"
    first, models = bus.usage[0]
    assert first.models[0].in_flight == 1 and models == [model(in_flight=1)], "the hash gets what the update says"
    assert all(m.model_id == "m" for event, _ in bus.usage for m in event.models)


def test_the_manager_marks_a_generation_queued_started_and_ended_but_not_a_health_check() -> None:
    loader = GatedLoader()
    loader.gate.set()
    marks: list[int] = []
    manager = ModelManager(loader, on_usage=lambda: marks.append(1))
    manager.load("m", Path("/m.gguf"))
    assert marks == [], "a load is a pool event, not usage"
    manager.check_health()
    assert marks == [], "a health check is not a use"

    first = manager.acquire("m")
    assert len(marks) == 1, "started"
    t, box = in_thread(manager.acquire, "m")
    wait_for(lambda: len(marks) == 2, 5, "the queued generation's mark")
    first.tokens = 3  # tokens mark nothing: the update that sees a generation running follows it up
    assert len(marks) == 2
    first.release()
    t.join(5)
    assert len(marks) == 5, "ended, left the queue, started"
    box["value"].release()  # type: ignore[attr-defined]
    assert len(marks) == 6
    info = manager.get("m")
    assert info is not None and info.tokens_generated == 3 and info.in_flight == 0


class GatedBus(UsageBus):
    """A Redis that is away until `gate` opens: pool events wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def publish(self, event: Any, *, models: Any = None, mode: str = "always", boot: str = "") -> str | None:
        self.waiting.set()
        self.gate.wait(10)
        return super().publish(event, models=models, mode=mode, boot=boot)


def test_usage_updates_held_up_behind_redis_go_out_as_the_newest_one_only() -> None:
    bus = GatedBus()
    events = NodeEvents(bus, node_info())  # type: ignore[arg-type]
    now: list[ModelInfo] = []
    events.with_models = lambda action: action(list(now))
    events.model_changed("model-loaded", model(), [model()])
    assert bus.waiting.wait(5)  # the events thread is stuck publishing it
    for in_flight in (1, 2, 3, 0):
        now[:] = [model(in_flight=in_flight)]
        events._queue_usage()  # what the throttle does once an interval
    bus.gate.set()
    assert events.flush(5)
    events.close()
    assert bus.published == [("model-loaded", "always"), ("model-usage", "usage")]
    assert [m.in_flight for m in bus.usage[0][1]] == [0]  # the newest: the stale ones would only flap the gauge
