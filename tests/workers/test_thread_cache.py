"""The node's generation threads are reused: an idle one takes the next request, a new one starts only when none
is idle, and one idle past its timeout ends."""

import threading

import pytest

from tests.conftest import wait_for
from workers.inference.threads import ThreadCache


def test_an_idle_thread_takes_the_next_job() -> None:
    cache = ThreadCache("t", idle_timeout=30)
    ran: list[str] = []
    for _ in range(5):
        done = threading.Event()
        cache.submit(lambda done=done: (ran.append(threading.current_thread().name), done.set()))  # type: ignore[misc]
        assert done.wait(5)
        wait_for(lambda: cache.idle == 1, 5, "the thread to be idle again")
    assert ran == ["t-1"] * 5


def test_jobs_at_once_each_get_a_thread_of_their_own() -> None:
    cache = ThreadCache("t", idle_timeout=30)
    gate, names = threading.Barrier(4, timeout=5), set()

    def job() -> None:
        names.add(threading.current_thread().name)
        gate.wait()  # all four run at the same time, or this times out

    for _ in range(3):
        cache.submit(job)
    gate_main = threading.Thread(target=gate.wait)
    gate_main.start()
    gate_main.join(10)
    assert not gate.broken and len(names) == 3
    wait_for(lambda: cache.idle == 3, 5, "the three threads to be idle")


def test_a_job_that_raises_is_logged_and_its_thread_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    cache = ThreadCache("t-fail", idle_timeout=30)
    cache.submit(lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    wait_for(lambda: cache.idle == 1, 5, "the thread to be idle again")
    assert "a job on thread t-fail-1 failed" in caplog.text and "ZeroDivisionError" in caplog.text
    ran: list[str] = []
    done = threading.Event()
    cache.submit(lambda: (ran.append(threading.current_thread().name), done.set()))  # type: ignore[func-returns-value]
    assert done.wait(5) and ran == ["t-fail-1"]


def test_a_thread_idle_past_its_timeout_ends() -> None:
    cache = ThreadCache("t-idle", idle_timeout=0.1)
    cache.submit(lambda: None)
    alive = lambda: [t for t in threading.enumerate() if t.name.startswith("t-idle-")]  # noqa: E731
    wait_for(lambda: not alive(), 5, "the idle thread to end")
    assert cache.idle == 0
    done = threading.Event()
    cache.submit(done.set)  # a new thread serves after the old one ended
    assert done.wait(5)
