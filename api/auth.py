"""Bearer keys in two scopes. Keys are kept only as SHA-256 digests and compared in constant time."""

import hashlib
import hmac
from enum import IntEnum

from pydantic import SecretStr

from broker.errors import Forbidden, Unauthenticated


class Scope(IntEnum):
    READ = 1
    OPERATOR = 2


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """Knows which scope a presented key has, without holding the keys themselves."""

    def __init__(self, operator_keys: list[SecretStr], read_keys: list[SecretStr]) -> None:
        self._digests = [(_digest(k.get_secret_value()), Scope.OPERATOR) for k in operator_keys]
        self._digests += [(_digest(k.get_secret_value()), Scope.READ) for k in read_keys]

    def __len__(self) -> int:
        return len(self._digests)

    def scope_of(self, presented: str) -> Scope | None:
        candidate = _digest(presented)
        found: Scope | None = None
        for digest, scope in self._digests:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(candidate, digest) and (found is None or scope > found):
                found = scope
        return found

    def authorize(self, header: str | None, needed: Scope) -> Scope:
        """Check an Authorization header; raise Unauthenticated (401) or Forbidden (403)."""
        if not header:
            raise Unauthenticated("Missing API key: send 'Authorization: Bearer <key>'.")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Malformed Authorization header: expected 'Bearer <key>'.")
        scope = self.scope_of(token.strip())
        if scope is None:
            raise Unauthenticated("Invalid API key.")
        if scope < needed:
            raise Forbidden("This key is read-only; loading and unloading models needs an operator key.")
        return scope
