"""When a node publishes its models' usage: at most once an interval while it changes, and once after the last change.

The manager marks a change (a generation queued, started or finished) with its registry lock held: that sets a
flag and wakes the `modelfleet-usage` thread, nothing more. Tokens are never marked one by one: while a generation
runs, its tokens keep coming, so an update that finds anything in flight or queued marks the next interval as due
too. The result: one update an interval while prompts run, one more after the last one ends (showing it idle),
and nothing at all while the node is idle.

The thread only decides when; what goes out, and in which order, is `workers.events.NodeEvents`'s business.
"""

import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
"""Seconds between two usage updates of a node, at least."""


class Throttle:
    """The rule alone, on a clock the caller passes: changes marked between two updates make one update."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pending = False
        self._next = -math.inf

    def mark(self) -> None:
        self.pending = True

    def wait(self, now: float) -> float | None:
        """Seconds until the pending update is due (0 or less: now); None if nothing is pending."""
        return self._next - now if self.pending else None

    def take(self, now: float) -> bool:
        """Whether an update is due now; if so, it counts as sent and the next one waits an interval."""
        if not self.pending or now < self._next:
            return False
        self.pending = False
        self._next = now + self.interval
        return True


class UsageThrottle:
    """Runs `publish` on its own thread as `Throttle` says. `publish` queues one update and returns whether any
    generation is still running or queued (then the next interval publishes again: its tokens move on)."""

    def __init__(
        self,
        publish: Callable[[], bool],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self._clock = clock
        self._rule = Throttle(interval)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="modelfleet-usage", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """Mark a change (called under the manager's lock: it only sets a flag and wakes the thread)."""
        with self._cond:
            self._rule.mark()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rule.take(self._clock()):
                    self._cond.wait(self._rule.wait(self._clock()))
                if self._closed:
                    return
            # Outside our lock: `publish` takes the manager's, under which `changed` takes ours.
            try:
                busy = self._publish()
            except Exception:  # one failed update must not end every later one for the life of the process
                log.exception("queueing a usage update failed; the next change tries again")
                continue
            if busy:
                self.changed()
