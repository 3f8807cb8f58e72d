"""The wrong-key buckets of `broker.wrong_keys`, on a clock the test moves, with a real KeyRing."""

import logging

import pytest
from pydantic import SecretStr

from broker import wrong_keys
from broker.auth import KeyRing, Scope
from broker.errors import Forbidden, TooManyWrongKeys, Unauthenticated
from broker.wrong_keys import WrongKeys, address_group

KEYRING = KeyRing([SecretStr("operator-key-0123456789")], [SecretStr("read-key-0123456789")])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(keys: WrongKeys, address: str, key: str, needed: Scope = Scope.READ) -> int | str:
    """What the address is answered for `key`: 200, 401, 403, or 'retry N' (429 and its Retry-After)."""
    try:
        keys.authorize(KEYRING, f"Bearer {key}", needed, address)
    except TooManyWrongKeys as exc:
        return f"retry {exc.details['retry_after']}"
    except Unauthenticated:
        return 401
    except Forbidden:
        return 403
    return 200


def guess(keys: WrongKeys, address: str, n: int) -> list[int | str]:
    return [answer(keys, address, f"guess-{i}") for i in range(n)]


def test_after_its_limit_an_address_gets_one_try_each_refill_and_its_new_keys_wait_too() -> None:
    clock = Clock()
    keys = WrongKeys(20, 60, clock=clock)
    assert guess(keys, "10.0.0.9", 20) == [401] * 20
    assert guess(keys, "10.0.0.9", 2) == ["retry 3", "retry 3"]  # one wrong key forgiven every 60 / 20 s
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == "retry 3"  # a right guess looks the same
    assert answer(keys, "10.0.0.8", "read-key-0123456789") == 200  # another address is not concerned
    clock.now += 2.5
    assert guess(keys, "10.0.0.9", 1) == ["retry 1"]
    clock.now += 0.5
    assert guess(keys, "10.0.0.9", 2) == [401, "retry 3"]  # one more try, then refused again
    clock.now += 60
    assert guess(keys, "10.0.0.9", 21) == [401] * 20 + ["retry 3"]  # a window later, all forgiven
    with pytest.raises(Unauthenticated, match="Missing API key"):
        keys.authorize(KEYRING, None, Scope.READ, "10.0.0.9")  # no key guesses nothing: told how to send one


def test_a_key_that_was_right_from_an_address_keeps_working_while_others_are_refused() -> None:
    """Everyone behind one NAT or proxy shares an address: a stream of wrong keys from one of them (or a script
    with a revoked key) must not lock the others out."""
    clock = Clock()
    keys = WrongKeys(20, 60, clock=clock)
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == 200
    assert answer(keys, "10.0.0.9", "operator-key-0123456789", Scope.OPERATOR) == 200
    assert guess(keys, "10.0.0.9", 25) == [401] * 20 + ["retry 3"] * 5
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == 200
    assert answer(keys, "10.0.0.9", "read-key-0123456789", Scope.OPERATOR) == 403  # its scope, as ever
    clock.now += wrong_keys.TRUSTED_FOR + 1  # not used for a day: new again
    assert guess(keys, "10.0.0.9", 20) == [401] * 20
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == "retry 3"


def test_ipv6_addresses_count_by_their_64() -> None:
    keys = WrongKeys(20, 60, clock=Clock())
    for i in range(20):  # one host picking a new address for each guess
        assert answer(keys, f"2001:db8:1:2::{i + 1:x}", f"guess-{i}") == 401
    assert answer(keys, "2001:db8:1:2:ffff::1", "guess-x") == "retry 3"
    assert answer(keys, "2001:db8:1:3::1", "guess-x") == 401  # the next /64 is someone else
    assert address_group("::ffff:10.0.0.9") == "10.0.0.9"
    assert address_group("10.0.0.9") == "10.0.0.9"
    assert address_group("fe80::1%eth0") == "fe80::/64"
    assert address_group("unknown") == "unknown"


def test_zero_turns_it_off() -> None:
    keys = WrongKeys(0, 60, clock=Clock())
    assert guess(keys, "10.0.0.9", 1000) == [401] * 1000
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == 200


def test_a_refusal_is_logged_once_a_window_with_the_address_and_never_a_key(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    keys = WrongKeys(3, 30, clock=clock)
    with caplog.at_level(logging.WARNING, logger="modelfleet.auth"):
        guess(keys, "10.0.0.9", 3)
        for _ in range(5):  # a guesser at the refill rate
            clock.now += 10
            guess(keys, "10.0.0.9", 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # when it starts, and once more a window later
    assert "10.0.0.9 sent 3 wrong keys within 30 s" in lines[0]
    assert not any("guess-" in line or "key-0123456789" in line for line in lines)


def test_memory_is_bounded_however_many_addresses_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrong_keys, "MAX_ENTRIES", 100)
    clock = Clock()
    keys = WrongKeys(1, 3600, clock=clock)  # a bucket takes an hour to refill: none is forgiven meanwhile
    for i in range(1000):
        guess(keys, f"10.0.{i // 250}.{i % 250}", 1)
        answer(keys, f"10.1.{i // 250}.{i % 250}", "read-key-0123456789")
    assert len(keys._buckets) <= 100 and len(keys._trusted) <= 100
    # The newest are kept: the last guesser is still refused.
    assert guess(keys, "10.0.3.249", 1) == ["retry 3600"]


def test_every_answer_is_counted_for_the_metrics() -> None:
    seen: list[str] = []
    keys = WrongKeys(2, 60, clock=Clock(), counted=seen.append)
    assert guess(keys, "10.0.0.9", 3) == [401, 401, "retry 30"]
    assert answer(keys, "10.0.0.9", "read-key-0123456789") == "retry 30"
    assert answer(keys, "10.0.0.8", "read-key-0123456789") == 200
    assert seen == ["wrong", "wrong", "refused", "refused"]
    off: list[str] = []
    assert guess(WrongKeys(0, 60, counted=off.append), "10.0.0.9", 3) == [401] * 3
    assert off == ["wrong"] * 3  # counted even when nothing is refused
