"""Stopping Python code that runs too long, or whose request was cancelled, in the thread that runs it.

A chat template comes from the model file: untrusted code that Jinja2's sandbox keeps from the process's
internals but not from looping for hours (`range` is capped at 100,000, so two nested loops take 10^10 steps).
It renders in the request's generation thread while the request holds its model, so a template that never ends
held the model forever: every later request for it queued behind, an unload timed out, the worker could not
stop. `interruptible` raises `Interrupted` in its thread, through CPython's asynchronous exceptions
(`PyThreadState_SetAsyncExc`, checked between bytecodes), once the block has run for `limit` seconds or
`stopped()` turns true: one watchdog thread per process looks at every watched block every POLL seconds.
A single native call (one huge string operation) is not interrupted until it returns: `workers.inference.chat`
bounds those itself.
"""

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

POLL = 0.05
"""Seconds between the watchdog's looks: how late past its limit (or its cancellation) a block stops."""


class Interrupted(Exception):
    """The watched block ran past its limit, or was stopped."""

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


@dataclass(eq=False)
class _Watch:
    thread: int
    deadline: float
    stopped: Callable[[], bool]
    fired: bool = False
    timed_out: bool = False


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    def add(self, watch: _Watch) -> None:
        with self._lock:
            self._watched.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelfleet-watchdog", daemon=True)
                self._thread.start()

    def remove(self, watch: _Watch, *, raised: bool) -> None:
        with self._lock:
            self._watched.discard(watch)
            if watch.fired and not raised:  # fired as the block ended: take the pending exception back
                _set_async_exc(watch.thread, None)

    def _run(self) -> None:
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            with self._lock:
                for watch in list(self._watched):
                    timed_out = now >= watch.deadline
                    if timed_out or watch.stopped():
                        watch.fired, watch.timed_out = True, timed_out
                        self._watched.discard(watch)
                        _set_async_exc(watch.thread, Interrupted)


_WATCHDOG = _Watchdog()


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(exc) if exc else None)


@contextmanager
def interruptible(limit: float, stopped: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Run the block in this thread; raise `Interrupted` in it once it has run `limit` seconds (`why`
    "timeout") or `stopped()` returns true (`why` "stopped")."""
    watch = _Watch(threading.get_ident(), time.monotonic() + limit, stopped)
    _WATCHDOG.add(watch)
    raised = False
    try:
        yield
    except Interrupted:
        raised = True
        raise Interrupted("timeout" if watch.timed_out else "stopped") from None
    finally:
        _WATCHDOG.remove(watch, raised=raised)
