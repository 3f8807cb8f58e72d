"""Events from a generation thread to the event loop, with one wake-up per batch instead of one per token.

`loop.call_soon_threadsafe` per token writes to the loop's self-pipe every time (a syscall, and an epoll wake-up
on the other side) even while the loop is still busy with the previous tokens. Here the thread appends to a
deque and wakes the loop only when the loop is waiting for an event; everything that arrived while it was busy
is there for it to take in one go.
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

    def put(self, item: T) -> None:
        """From any thread: add `item`; wake the consumer if it waits."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
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
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None


def _wake(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)
