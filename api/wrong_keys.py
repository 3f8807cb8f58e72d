"""Wrong API keys per client address: too many, and the address's keys are not checked for a while.

A key cannot then be guessed at the speed of the API: each address (the client's, or with uvicorn's
`FORWARDED_ALLOW_IPS` the one a trusted proxy names) has a bucket of `limit` wrong keys that refills over
`window` seconds. A request whose `Authorization` header, or whose dashboard sign-in, holds a key that is not
one of the fleet's takes one from it. With the bucket empty, every request from that address that brings a key
(right or wrong: a right guess must not stand out) is answered 429 `too_many_wrong_keys` with `Retry-After`,
until it refills enough for one more. A request with no key, or with the dashboard's session cookie, is not
counted and not refused: it guesses nothing. With the defaults (20 in 60 s), a script with a typo in its key is
refused after 20 tries, and a guesser gets one try every 3 s.

Each API process counts for itself, in memory: no Redis write for a wrong key, nothing in the way of a right
one (one dict lookup while some address is refused, none otherwise). Behind a load balancer over N processes,
an address gets up to N times the limit.
"""

import logging
import math
import time
from collections.abc import Callable

from broker.errors import TooManyWrongKeys

log = logging.getLogger("modelfleet.api")

MAX_ADDRESSES = 100_000
"""Buckets kept at most; beyond, the full ones (addresses whose wrong keys are forgotten) are dropped."""


class WrongKeys:
    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._rate = limit / window  # wrong keys forgiven per second
        self._clock = clock
        # address -> (wrong keys still allowed, as of when, when its refusal was last logged)
        self._buckets: dict[str, tuple[float, float, float]] = {}

    def check(self, address: str) -> None:
        """Raise TooManyWrongKeys if `address` may not have its key checked now."""
        if not self._buckets:
            return
        bucket = self._buckets.get(address)
        if bucket is None:
            return
        allowed = self._allowed(bucket)
        if allowed >= self.limit:
            del self._buckets[address]  # all forgiven
        if allowed >= 1:
            return
        retry = max(1, math.ceil((1 - allowed) / self._rate))
        raise TooManyWrongKeys(
            f"Too many wrong API keys from this address ({self.limit} in {self.window:g} s): no key from it is "
            f"checked for now. Try again in {retry} s, with the right key.",
            retry_after=retry,
        )

    def wrong(self, address: str) -> None:
        """Count a wrong key from `address`."""
        if self.limit <= 0:
            return
        bucket = self._buckets.get(address)
        now = self._clock()
        allowed = self._allowed(bucket) - 1
        logged = bucket[2] if bucket is not None else -math.inf
        if allowed < 1 and now - logged >= self.window:  # once a window while it goes on
            logged = now
            log.warning(
                "%s sent %d wrong API keys within %g s: its keys go unchecked (429) for a while "
                "(MODELFLEET_WRONG_KEY_LIMIT, MODELFLEET_WRONG_KEY_WINDOW)",
                address,
                self.limit,
                self.window,
            )
        self._buckets[address] = (allowed, now, logged)
        if len(self._buckets) > MAX_ADDRESSES:
            self._forget_full()

    def _allowed(self, bucket: tuple[float, float, float] | None) -> float:
        if bucket is None:
            return float(self.limit)
        allowed, at, _ = bucket
        return min(float(self.limit), allowed + (self._clock() - at) * self._rate)

    def _forget_full(self) -> None:
        for address in [a for a, bucket in self._buckets.items() if self._allowed(bucket) >= self.limit]:
            del self._buckets[address]
