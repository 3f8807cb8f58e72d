"""The one retry policy every reconnect loop uses: exponential backoff, capped, with full jitter.

Full jitter (a random delay between zero and the exponential bound, AWS's "Exponential Backoff And Jitter")
keeps a fleet of workers that lost the same Redis at the same moment from hammering it in lock-step when it
comes back. A loop that serves for a long time calls `reset()` after each success, so the next outage starts
from a short delay again; a bounded retry passes a `deadline` (a `time.time()` value) and gets `None` once
waiting any longer would pass it.

Sync loops (worker threads) call `sleep()`; async loops (the API's event loop) `await asleep()`.
"""

import asyncio
import random
import time


class Backoff:
    """Delays for one retry loop: `initial * 2**n` capped at `cap`, each drawn uniformly from [floor, bound]."""

    def __init__(self, initial: float = 0.1, cap: float = 2.0, *, floor: float = 0.05) -> None:
        self.initial = initial
        self.cap = cap
        self.floor = min(floor, initial)
        self.attempts = 0

    def reset(self) -> None:
        self.attempts = 0

    def next_delay(self, deadline: float | None = None) -> float | None:
        """The next delay, or None if sleeping it would pass `deadline` (then the caller gives up)."""
        bound = min(self.cap, self.initial * 2 ** min(self.attempts, 32))
        self.attempts += 1
        delay = random.uniform(self.floor, bound)
        if deadline is not None:
            left = deadline - time.time()
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def sleep(self, deadline: float | None = None) -> float | None:
        """Sleep the next delay; returns it, or None without sleeping if `deadline` is reached."""
        delay = self.next_delay(deadline)
        if delay is not None:
            time.sleep(delay)
        return delay

    async def asleep(self, deadline: float | None = None) -> float | None:
        delay = self.next_delay(deadline)
        if delay is not None:
            await asyncio.sleep(delay)
        return delay
