"""Stopping Python code that runs too long, or whose request was cancelled, in the thread that runs it.

A chat template comes from the model file: untrusted code that Jinja2's sandbox keeps from the process's
internals but not from looping for hours (`range` is capped at 100,000, so two nested loops take 10^10 steps).
It renders in the request's generation thread while the request holds its model, so a template that never ends
held the model forever: every later request for it queued behind, an unload timed out, the worker could not
stop. `interruptible` raises `Interrupted` in its thread, through CPython's asynchronous exceptions
(`PyThreadState_SetAsyncExc`, checked between bytecodes), once the block has run for `limit` seconds or
`stopped()` turns true: one watchdog thread per process looks at every watched block every POLL seconds.

`Interrupted` is a BaseException, as KeyboardInterrupt is: library code's `except Exception` (Jinja's own, or
a test such as `is sequence` calling `__len__`) neither swallows it nor rewrites its traceback. Once fired, it
fires again every REFIRE seconds until the block is left, in case something swallowed it all the same; the
block's exit takes back any that is still pending. A single native call (one huge string operation) is not
interrupted until it returns: `workers.inference.chat` bounds the ones it can.
"""

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

POLL = 0.05
"""Seconds between the watchdog's looks: how late past its limit (or its cancellation) a block stops."""
REFIRE = 1.0
"""Seconds after which a block that is still running is interrupted again."""


class Interrupted(BaseException):
    """The watched block ran past its limit, or was stopped."""

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


@dataclass(eq=False)
class _Watch:
    thread: int
    deadline: float
    stopped: Callable[[], bool]
    fired: float | None = None
    """When it last fired (the clock's time)."""
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

    def remove(self, watch: _Watch) -> None:
        with self._lock:
            self._watched.discard(watch)
            if watch.fired is not None:  # one may still be pending (fired as the block ended): take it back
                _set_async_exc(watch.thread, None)

    def _run(self) -> None:
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            with self._lock:
                for watch in self._watched:
                    if watch.fired is not None:
                        if now - watch.fired >= REFIRE:  # still running: whatever caught it, again
                            watch.fired = now
                            _set_async_exc(watch.thread, Interrupted)
                        continue
                    timed_out = now >= watch.deadline
                    if timed_out or watch.stopped():
                        watch.fired, watch.timed_out = now, timed_out
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
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # whatever the interruption became on its way out (or any other failure)
        failure = exc
    finally:
        _WATCHDOG.remove(watch)
    if watch.fired is not None:
        raise Interrupted("timeout" if watch.timed_out else "stopped") from None
    if failure is not None:
        raise failure
