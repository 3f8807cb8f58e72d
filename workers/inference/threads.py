"""Threads for generations, kept between requests: a request starts on an idle thread without waiting for one.

`threading.Thread.start()` blocks its caller until the new thread has run (on a busy CPU, until it has also had
the GIL): measured in a node, 0.9 ms of every request's time to first token, spent on the event loop. Here a
request is handed to an idle thread through a queue and the loop goes on at once; a new thread starts only when
none is idle, and one left idle for `idle_timeout` seconds ends. Threads are daemons, as generation threads
were: a stuck native call never holds up the process's exit. There is no upper bound on threads: the node's
queue per model (`--max-queue`, 429 beyond it) bounds how many requests wait at once.
"""

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class ThreadCache:
    def __init__(self, name: str, *, idle_timeout: float = 60.0) -> None:
        self._name = name
        self._idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0

    @property
    def idle(self) -> int:
        with self._lock:
            return self._idle

    def submit(self, job: Job) -> None:
        """Run `job` on an idle thread, or on a new one if none is idle; never waits."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread is spoken for: the job is in the queue before anyone looks
                self._jobs.put(job)
                return
            self._started += 1
            number = self._started
        threading.Thread(target=self._run, args=(job,), name=f"{self._name}-{number}", daemon=True).start()

    def _run(self, job: Job | None) -> None:
        while job is not None:
            try:
                job()
            except Exception:  # a job handles its own failures; one that escapes is a bug, logged, not fatal
                log.exception("a job on thread %s failed", threading.current_thread().name)
            del job  # nothing of a finished request is kept alive by an idle thread
            with self._lock:
                self._idle += 1
            job = self._next()

    def _next(self) -> Job | None:
        try:
            return self._jobs.get(timeout=self._idle_timeout)
        except queue.Empty:
            with self._lock:
                try:  # a submit that counted on this thread just before the timeout: its job is queued
                    return self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return None
