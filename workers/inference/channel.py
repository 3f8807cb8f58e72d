"""Events from a generation thread to the event loop, with one wake-up per batch instead of one per token.

`loop.call_soon_threadsafe` per token writes to the loop's self-pipe every time (a syscall, and an epoll wake-up
on the other side) even while the loop is still busy with the previous tokens. Here the thread appends to a
deque and wakes the loop only when the loop is waiting for an event; everything that arrived while it was busy
is there for it to take in one go. A consumer that spaces its reads out (`pause`) is woken early only by the
last item, so the end of a stream never waits out a pause.
"""

import asyncio
import collections
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    """Many events from one producing thread to one consumer on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._waiter_wants_last = False  # the waiter is a `pause`: only the last item ends it
        self._ended = False

    def put(self, item: T, *, last: bool = False) -> None:
        """From any thread: add `item`; wake the consumer if it waits for it. `last`: nothing follows it."""
        with self._lock:
            self._items.append(item)
            self._ended = self._ended or last
            waiter = self._waiter
            if waiter is None or (self._waiter_wants_last and not last):
                return
            self._waiter = None
        self._loop.call_soon_threadsafe(_wake, waiter)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        return self._items.popleft()

    async def get(self) -> T:
        """On the loop: the next item, waiting for it if none is there."""
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
            await self._wait(want_last=False)

    async def pause(self, seconds: float) -> None:
        """On the loop: wait `seconds`, or less: until the last item is there (no wait if it already is)."""
        with self._lock:
            if self._ended:
                return
        timer = self._loop.call_later(seconds, self._expire)
        try:
            await self._wait(want_last=True)
        finally:
            timer.cancel()

    async def _wait(self, *, want_last: bool) -> None:
        with self._lock:
            if self._items if not want_last else self._ended:
                return  # arrived between the caller's look and this one
            waiter = self._waiter = self._loop.create_future()
            self._waiter_wants_last = want_last
        try:
            await waiter
        finally:
            with self._lock:
                if self._waiter is waiter:
                    self._waiter = None

    def _expire(self) -> None:
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)


def _wake(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)
