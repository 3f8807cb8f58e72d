"""Fixtures of the broker's unit tests."""

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

Run = Callable[[Coroutine[Any, Any, Any]], Any]
"""The `run` fixture: `run(coroutine)` is its result."""


@pytest.fixture
def run() -> Iterator[Run]:
    """Runs coroutines one after the other on one event loop, for a test that keeps an asyncio client between
    them: a client's connection belongs to the loop it was made on (with hiredis, fakeredis' reads say so)."""
    with asyncio.Runner() as runner:
        yield runner.run
