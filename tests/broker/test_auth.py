"""KeyRing: scopes, constant-time comparison over digests, clear errors."""

import pytest
from pydantic import SecretStr

from broker.auth import KeyRing, Scope
from broker.errors import Forbidden, Unauthenticated


def ring() -> KeyRing:
    return KeyRing([SecretStr("op-1"), SecretStr("op-2")], [SecretStr("ro-1")])


def test_scopes() -> None:
    keys = ring()
    assert keys.authorize("Bearer op-2", Scope.OPERATOR) is Scope.OPERATOR
    assert keys.authorize("bearer ro-1", Scope.READ) is Scope.READ
    assert keys.authorize("Bearer op-1", Scope.READ) is Scope.OPERATOR


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic op-1", "Bearer op-3", "op-1"])
def test_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        ring().authorize(header, Scope.READ)


def test_read_only_key_is_forbidden_to_operate() -> None:
    with pytest.raises(Forbidden):
        ring().authorize("Bearer ro-1", Scope.OPERATOR)


def test_keys_are_kept_only_as_digests() -> None:
    keys = ring()
    assert "op-1" not in repr(vars(keys)) and len(keys) == 3
