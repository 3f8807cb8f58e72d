"""The head's keys: `broker.auth.KeyRing`, shared with the nodes' inference endpoints."""

from broker.auth import KeyRing, Scope

__all__ = ["KeyRing", "Scope"]
