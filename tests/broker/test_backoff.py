"""The shared retry policy: bounded, jittered, reset by success, never past a deadline."""

import time

from broker.backoff import Backoff


def test_delays_grow_to_the_cap_with_jitter_and_start_over_after_reset() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(d is not None and 0 < d <= 1.0 for d in delays)
    assert len(set(delays)) > 6, "jittered, not lock-step"
    backoff.reset()
    assert (backoff.next_delay() or 0) <= 0.1


def test_no_delay_past_the_deadline() -> None:
    backoff = Backoff(10.0, 10.0)
    delay = backoff.next_delay(deadline=time.time() + 0.05)
    assert delay is not None and delay <= 0.05
    assert backoff.next_delay(deadline=time.time() - 1) is None
