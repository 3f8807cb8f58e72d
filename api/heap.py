"""Keeping the garbage collector's full collections off the event streams.

CPython's full collection walks every tracked object the process holds, and holds the interpreter while it does.
An API process holds about 100,000 objects once started (modules, classes, FastAPI's routes, pydantic's schemas)
and some 250 more per open event stream (its coroutines down the middleware stack, its task group, its
connection's protocol objects), none of which is garbage while the stream is open. With 1,000 streams a full
collection walked 340,000 objects and paused every stream for 215-465 ms, every 2-4 s, as deliveries kept
promoting short-lived objects into the oldest generation: that was the event streams' p99.

`Heap` moves what is long-lived out of the collector's sight with `gc.freeze()`: once at start-up (the event relay
owns one and settles it when it starts, the app built and its services up), and again
(`settle`) once `least` streams have opened since the last time, `delay` seconds after the last of them (their
objects exist by then), or at the latest `longest` seconds after the first. Full collections then walk only what
came since: a few thousand objects, and fewer than `least` streams' worth. Frozen objects are still freed by
reference counting when a stream ends; only a reference cycle among them outlives it, until the next settle,
which unfreezes everything, collects once (that one pause) and freezes again.
"""

import asyncio
import gc
import time
from collections.abc import Callable


class Heap:
    """When the garbage collector is told what is long-lived: at start-up, and as event streams come."""

    def __init__(
        self,
        *,
        least: int = 100,
        delay: float = 1.0,
        longest: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._least = least
        self._delay = delay
        self._longest = longest
        self._clock = clock
        self._new = 0
        self._first: float | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.settled = 0
        """How many times the heap was settled (start-up included)."""

    def settle(self) -> None:
        """Collect everything once, then freeze what survived: later full collections skip it."""
        self._cancel()
        self._new = 0
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.settled += 1

    def opened(self) -> None:
        """A stream opened: settle once `least` have, when they stop coming (or `longest` after the first)."""
        self._new += 1
        if self._new < self._least:
            return
        at = self._clock()
        if self._first is None:
            self._first = at
        elif at - self._first >= self._longest:
            return  # a steady trickle: the settle already scheduled is not put off again
        if self._pending is not None:
            self._pending.cancel()
        self._pending = asyncio.get_running_loop().call_later(self._delay, self.settle)

    def release(self) -> None:
        """Hand everything back to the collector (the app stops; a test process goes on)."""
        self._cancel()
        gc.unfreeze()

    def _cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = None
        self._first = None
