"""Dashboard sessions: the API key is presented once, at sign-in; the browser then holds only a random session id
in an HttpOnly cookie that page scripts cannot read.

Redis keeps each session under `keys.session(<digest of its id>)`: the id of the key that signed it in
(`KeyRing.identify`, a digest) and its scope, with a TTL renewed on every use, so an idle session ends after
`session_ttl`. Neither the key nor the session id is stored: whoever reads Redis can neither sign in nor ride a
session. Every use checks that the key is still configured, so removing a key ends its sessions at once.

Sessions live in Redis, not in one process's memory, so that a page keeps its session across an API restart
(its event stream reconnects without a new sign-in) and behind several API processes.

The CSRF token is derived from the session id, so it needs no storage either. A page gets it from
`GET /api/v1/session` (which a page of another site cannot read) and sends it in `X-CSRF-Token` with every
request that changes something; a cookie-authenticated change without it is refused (`api.deps`).
"""

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from broker import keys
from broker.auth import KeyRing, Scope
from broker.schemas import DashboardSession, read_lenient

log = logging.getLogger(__name__)

COOKIE = "modelfleet_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _derive(label: bytes, session_id: str) -> str:
    return hashlib.sha256(label + session_id.encode("ascii")).hexdigest()


def csrf_token(session_id: str) -> str:
    return _derive(b"modelfleet-csrf:", session_id)


@dataclass(frozen=True)
class Session:
    """A live session: its scope now (never more than the key has today) and its CSRF token."""

    scope: Scope
    csrf_token: str

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token.encode())


class SessionStore:
    """Creates, reads (renewing) and ends sessions in Redis."""

    def __init__(self, client: aioredis.Redis, keyring: KeyRing, *, ttl: float) -> None:
        self._redis = client
        self._keyring = keyring
        self._ttl_ms = int(ttl * 1000)

    async def create(self, key: str) -> tuple[str, Session] | None:
        """A new session for `key`: (its id, for the cookie only; the session), or None for an unknown key."""
        identity = self._keyring.identify(key)
        if identity is None:
            return None
        key_id, scope = identity
        session_id = secrets.token_urlsafe(32)
        record = DashboardSession(key_id=key_id, scope=int(scope), created_at=datetime.now(UTC))
        await self._redis.set(self._key(session_id), record.model_dump_json(by_alias=True), px=self._ttl_ms)
        return session_id, Session(scope, csrf_token(session_id))

    async def get(self, session_id: str) -> Session | None:
        """The session, its idle timeout renewed; None if it ended, never existed, or its key was removed."""
        if not SESSION_ID_RE.fullmatch(session_id):
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._key(session_id))
        pipe.pexpire(self._key(session_id), self._ttl_ms)
        raw, _ = await pipe.execute()
        if raw is None:
            return None
        try:
            record = read_lenient(DashboardSession, raw)
            stored = Scope(record.scope)
        except ValueError:  # pydantic's ValidationError included
            log.warning("a dashboard session this API cannot read was ended")
            await self.end(session_id)
            return None
        now = self._keyring.scope_of_id(record.key_id)
        if now is None:
            await self.end(session_id)  # the key was removed from the configuration
            return None
        return Session(min(stored, now), csrf_token(session_id))

    async def end(self, session_id: str) -> None:
        if SESSION_ID_RE.fullmatch(session_id):
            await self._redis.delete(self._key(session_id))

    @staticmethod
    def _key(session_id: str) -> str:
        return keys.session(_derive(b"modelfleet-session:", session_id))
