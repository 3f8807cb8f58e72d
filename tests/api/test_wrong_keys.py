"""The wrong-key buckets of `api.wrong_keys`, on a clock the test moves."""

import logging

import pytest

from api.wrong_keys import WrongKeys
from broker.errors import TooManyWrongKeys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(keys: WrongKeys, address: str) -> int | None:
    """The Retry-After seconds if `address` is refused now, else None."""
    try:
        keys.check(address)
    except TooManyWrongKeys as exc:
        return int(exc.details["retry_after"])
    return None


def test_an_address_is_refused_after_its_limit_then_gets_one_try_each_refill() -> None:
    clock = Clock()
    keys = WrongKeys(20, 60, clock=clock)
    for _ in range(20):
        assert refused(keys, "10.0.0.9") is None
        keys.wrong("10.0.0.9")
    assert refused(keys, "10.0.0.9") == 3  # one wrong key forgiven every 60 / 20 s
    assert refused(keys, "10.0.0.8") is None  # another address is not concerned
    clock.now += 2.5
    assert refused(keys, "10.0.0.9") == 1
    clock.now += 0.5
    assert refused(keys, "10.0.0.9") is None  # one more try...
    keys.wrong("10.0.0.9")
    assert refused(keys, "10.0.0.9") == 3  # ...and refused again
    clock.now += 60
    for _ in range(20):  # a whole window later, everything is forgiven
        assert refused(keys, "10.0.0.9") is None
        keys.wrong("10.0.0.9")
    assert refused(keys, "10.0.0.9") == 3


def test_right_keys_do_not_refill_the_bucket_and_a_forgiven_address_is_forgotten() -> None:
    clock = Clock()
    keys = WrongKeys(2, 10, clock=clock)
    keys.wrong("a")
    keys.check("a")  # a right key in between changes nothing
    keys.wrong("a")
    assert refused(keys, "a") == 5
    clock.now += 10
    assert refused(keys, "a") is None
    assert keys._buckets == {}  # nothing kept for an address with nothing against it


def test_zero_turns_it_off() -> None:
    keys = WrongKeys(0, 60, clock=Clock())
    for _ in range(1000):
        keys.wrong("10.0.0.9")
    assert refused(keys, "10.0.0.9") is None


def test_a_refusal_is_logged_once_a_window_with_the_address_and_never_a_key(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    keys = WrongKeys(3, 30, clock=clock)
    with caplog.at_level(logging.WARNING, logger="modelfleet.api"):
        for _ in range(3):
            keys.wrong("10.0.0.9")
        for _ in range(5):  # a guesser at the refill rate
            clock.now += 10
            keys.wrong("10.0.0.9")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # when it starts, and once more a window later
    assert "10.0.0.9 sent 3 wrong API keys within 30 s" in lines[0]


def test_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import api.wrong_keys as wrong_keys

    monkeypatch.setattr(wrong_keys, "MAX_ADDRESSES", 100)
    clock = Clock()
    keys = WrongKeys(5, 5, clock=clock)
    for i in range(100):
        keys.wrong(f"10.0.{i}.1")
    clock.now += 5  # all forgiven
    keys.wrong("10.1.0.1")
    assert len(keys._buckets) == 1
