"""Wrong keys per client address: after too many, the keys that address sends are not judged for a while.

Without this, a key can be guessed as fast as the API (or a node's endpoint) answers. Each address has a bucket
of `limit` wrong keys that refills over `window` seconds; each wrong key, in an `Authorization` header or a
dashboard sign-in, takes one from it. While the bucket is empty, the address is refused: a key it sends gets 429
`too_many_wrong_keys` with `Retry-After`, whether it is right or wrong, so that a right guess does not stand out
among the refusals. With the defaults (20 in 60 s), a guesser gets one try every 3 s.

Refusing right keys would let anyone who shares an address (a NAT, a proxy, a load balancer whose clients'
addresses the API is not told, every local client) keep everyone else out with a stream of wrong keys, or a
forgotten script with a revoked key do it by accident. So a key that was right from that address before
(within `TRUSTED_FOR`) is still let in while the address is refused: an attacker who does not know it cannot
use that, and the clients that were working keep working. Only keys new to the address wait.

The address is the one uvicorn gives (the client's, or with `FORWARDED_ALLOW_IPS` the one a trusted proxy
names; uvicorn trusts 127.0.0.1 by default, so a local client can name any address). IPv6 addresses count by
their /64, what one host can usually pick from. Requests without a key are not concerned: they guess nothing.

Each process counts for itself, in memory: no Redis write for a wrong key, and for a right one a dict update.
Behind N API processes, an address gets up to N times the limit.
"""

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.auth import KeyRing, Scope
from broker.errors import Forbidden, TooManyWrongKeys, Unauthenticated

log = logging.getLogger("modelfleet.auth")

MAX_ENTRIES = 100_000
"""Addresses with wrong keys, and (address, key) pairs that were right, kept at most each; beyond, the oldest
go first."""
TRUSTED_FOR = 24 * 3600.0
"""Seconds a key stays known as right from an address since it last was."""


def client_address(scope: Mapping[str, Any]) -> str:
    """The caller's address in an ASGI request's `scope` (after uvicorn's proxy headers, if it trusts them)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def address_group(address: str) -> str:
    """What counts as one address: an IPv4 address as it is, an IPv6 one by its /64."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class WrongKeys:
    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        """`counted("wrong")` for each wrong key answered as such (even with `limit` 0), `counted("refused")` for
        each key refused unjudged: for metrics."""
        self.limit = limit
        self._counted = counted or (lambda outcome: None)
        self.window = window
        self._rate = limit / window  # wrong keys forgiven per second
        self._clock = clock
        # address group -> (wrong keys still allowed, as of when, when its refusal was last logged)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        # (address group, hash of the key) -> when that key was last right from there
        self._trusted: dict[tuple[str, int], float] = {}

    def authorize(self, keyring: KeyRing, header: str | None, needed: Scope, address: str) -> Scope:
        """`keyring.authorize(header, needed)` for a request from `address`, its wrong keys counted; raises
        TooManyWrongKeys instead while the address is refused (for a key it has not used before)."""
        if not header:
            return keyring.authorize(header, needed)  # no key: nothing guessed
        token = header.partition(" ")[2].strip()
        try:
            scope = keyring.authorize(header, needed)
        except Unauthenticated:
            self.wrong(address)
            raise
        except Forbidden:
            self.right(address, token)
            raise
        self.right(address, token)
        return scope

    def wrong(self, address: str) -> None:
        """A wrong key from `address`: counted, or TooManyWrongKeys raised if the address is refused now (a
        refusal is not counted: the bucket refills at its pace whatever the address sends meanwhile)."""
        if self.limit <= 0:
            self._counted("wrong")
            return
        group = address_group(address)
        bucket = self._buckets.get(group)
        now = self._clock()
        allowed = self._allowed(bucket, now)
        if allowed < 1:
            raise self._refusal(allowed)
        self._counted("wrong")
        allowed -= 1
        logged = bucket[2] if bucket is not None else -math.inf
        if allowed < 1 and now - logged >= self.window:  # once a window while it goes on
            logged = now
            log.warning(
                "%s sent %d wrong keys within %g s: keys new to it are refused (429) for a while "
                "(MODELFLEET_WRONG_KEY_LIMIT, MODELFLEET_WRONG_KEY_WINDOW)",
                group,
                self.limit,
                self.window,
            )
        self._buckets.pop(group, None)  # re-inserted last: the dict's order is the order of last use
        self._buckets[group] = (allowed, now, logged)
        if len(self._buckets) > MAX_ENTRIES:
            self._forget_buckets(now)

    def right(self, address: str, key: str) -> None:
        """A right key from `address`: let in, unless the address is refused and the key was not right from it
        before (then TooManyWrongKeys is raised)."""
        if self.limit <= 0:
            return
        group = address_group(address)
        now = self._clock()
        pair = (group, hash(key))  # a hash, not the key: nothing here keeps a key alive
        if self._buckets and (bucket := self._buckets.get(group)) is not None:
            allowed = self._allowed(bucket, now)
            if allowed >= self.limit:
                del self._buckets[group]  # all forgiven
            elif allowed < 1 and now - self._trusted.get(pair, -math.inf) > TRUSTED_FOR:
                raise self._refusal(allowed)
        self._trusted.pop(pair, None)
        self._trusted[pair] = now
        if len(self._trusted) > MAX_ENTRIES:
            self._forget_trusted(now)

    def _refusal(self, allowed: float) -> TooManyWrongKeys:
        self._counted("refused")
        retry = max(1, math.ceil((1 - allowed) / self._rate))
        return TooManyWrongKeys(
            f"Too many wrong keys from this address ({self.limit} in {self.window:g} s): a key it has not used "
            f"before is not accepted for now. Try again in {retry} s, with the right key.",
            retry_after=retry,
        )

    def _allowed(self, bucket: tuple[float, float, float] | None, now: float) -> float:
        if bucket is None:
            return float(self.limit)
        allowed, at, _ = bucket
        return min(float(self.limit), allowed + (now - at) * self._rate)

    def _forget_buckets(self, now: float) -> None:
        """Drop the forgiven buckets, then the least recently used ones, down to 90% of MAX_ENTRIES."""
        for group in [g for g, bucket in self._buckets.items() if self._allowed(bucket, now) >= self.limit]:
            del self._buckets[group]
        _drop_oldest(self._buckets, len(self._buckets) - MAX_ENTRIES * 9 // 10)

    def _forget_trusted(self, now: float) -> None:
        for pair in [p for p, at in self._trusted.items() if now - at > TRUSTED_FOR]:
            del self._trusted[pair]
        _drop_oldest(self._trusted, len(self._trusted) - MAX_ENTRIES * 9 // 10)


def _drop_oldest(entries: dict[Any, Any], count: int) -> None:
    for key in list(entries)[: max(0, count)]:
        del entries[key]
