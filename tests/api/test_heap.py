"""`api.heap.Heap`: what it freezes, when, and that nothing frozen is kept past the next settle."""

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from api.heap import Heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on with its collector whole


def cycle() -> "weakref.ref[Node]":
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_settle_freezes_what_lives_and_release_hands_it_back() -> None:
    heap = Heap()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert heap.settled == 1
    heap.release()
    assert gc.get_freeze_count() == 0


def test_a_frozen_cycle_is_collected_by_the_next_settle() -> None:
    heap = Heap()
    held = [cycle()]
    node = held[0]()
    heap.settle()  # the cycle is alive: frozen
    del node
    gc.collect()
    assert held[0]() is not None  # garbage now, but frozen: a full collection does not see it
    heap.settle()
    assert held[0]() is None


def test_settles_once_enough_streams_opened() -> None:
    async def run() -> None:
        heap = Heap(least=3, delay=0.0)
        for _ in range(2):
            heap.opened()
        for _ in range(5):
            await asyncio.sleep(0)
        assert heap.settled == 0  # two new streams: not worth a full collection
        heap.opened()
        for _ in range(100):
            if heap.settled:
                break
            await asyncio.sleep(0)
        assert heap.settled == 1
        heap.opened()  # the count starts over after a settle
        for _ in range(5):
            await asyncio.sleep(0)
        assert heap.settled == 1
        heap.release()

    asyncio.run(run())


def test_release_cancels_a_pending_settle() -> None:
    async def run() -> None:
        heap = Heap(least=1, delay=0.0)
        heap.opened()
        heap.release()
        for _ in range(5):
            await asyncio.sleep(0)
        assert heap.settled == 0

    asyncio.run(run())
