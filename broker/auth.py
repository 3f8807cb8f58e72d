"""Bearer keys in two scopes. Keys are kept only as SHA-256 digests and compared in constant time.

Shared by the head (which checks every request) and the nodes (which check direct calls to their inference
endpoint, and the head's calls with the fleet's node token, `MODELFLEET_NODE_TOKEN`).

A dashboard session (`api.sessions`) remembers which key signed it in by the key's *id*, a digest of its digest:
enough to end the session when the operator removes the key, useless for presenting the key.
"""

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


def _key_id(digest: bytes) -> str:
    return hashlib.sha256(b"modelfleet-key-id:" + digest).hexdigest()[:32]


class KeyRing:
    """Knows which scope a presented key has, without holding the keys themselves."""

    def __init__(self, operator_keys: list[SecretStr], read_keys: list[SecretStr]) -> None:
        self._digests = [(_digest(k.get_secret_value()), Scope.OPERATOR) for k in operator_keys]
        self._digests += [(_digest(k.get_secret_value()), Scope.READ) for k in read_keys if k.get_secret_value()]

    def __len__(self) -> int:
        return len(self._digests)

    def scope_of(self, presented: str) -> Scope | None:
        candidate = _digest(presented)
        found: Scope | None = None
        for digest, scope in self._digests:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(candidate, digest) and (found is None or scope > found):
                found = scope
        return found

    def identify(self, presented: str) -> tuple[str, Scope] | None:
        """The key's id and scope, or None if it is not one of ours."""
        scope = self.scope_of(presented)
        return None if scope is None else (_key_id(_digest(presented)), scope)

    def scope_of_id(self, key_id: str) -> Scope | None:
        """The scope the key with this id has now (None once the operator removed it)."""
        found: Scope | None = None
        for digest, scope in self._digests:
            if hmac.compare_digest(_key_id(digest), key_id) and (found is None or scope > found):
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
