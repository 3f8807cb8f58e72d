"""Request dependencies: the services on app.state as `Annotated` aliases, and the auth scopes (`secured`).

A request authenticates with `Authorization: Bearer <key>` (scripts, the CLI, openai-python) or with the
dashboard's session cookie (`api.sessions`). The header wins when both are sent. A cookie-authenticated request
that changes something must also carry the session's CSRF token.
"""

from collections.abc import Awaitable, Callable
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.security import APIKeyCookie, HTTPBearer

from api.events import EventRelay
from api.jobs import JobClient
from api.metrics import Metrics
from api.pool import Pool
from api.proxy import NodeProxy
from api.sessions import COOKIE, CSRF_HEADER, Session, SessionStore
from api.settings import ApiSettings
from broker.auth import KeyRing, Scope
from broker.errors import Forbidden, Unauthenticated
from broker.registry import NodeDirectory
from broker.wrong_keys import WrongKeys, client_address

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Declared in the OpenAPI schema (two alternative schemes, `secured`); the checks below read the raw header and
# cookie, so that a malformed header still gets our own message.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
session_scheme = APIKeyCookie(
    name=COOKIE,
    auto_error=False,
    description="The dashboard's session (`POST /api/v1/session`); changes also need the `X-CSRF-Token` header.",
)


def _state(request: Request):
    return request.app.state


# The getters below are coroutines although they never wait: FastAPI runs a plain `def` dependency in its thread
# pool, a thread hop (a fraction of a millisecond, more on a busy CPU) per dependency per request.


async def get_settings(request: Request) -> ApiSettings:
    return _state(request).settings


async def get_directory(request: Request) -> NodeDirectory:
    return _state(request).directory


async def get_jobs(request: Request) -> JobClient:
    return _state(request).jobs


async def get_relay(request: Request) -> EventRelay:
    return _state(request).relay


async def get_metrics(request: Request) -> Metrics:
    return _state(request).metrics


async def get_proxy(request: Request) -> NodeProxy:
    return _state(request).proxy


async def get_pool(request: Request) -> Pool:
    state = _state(request)
    return Pool(state.directory, state.jobs)


async def get_sessions(request: Request) -> SessionStore:
    return _state(request).sessions


async def current_session(request: Request) -> Session | None:
    """The dashboard session the request's cookie holds, if any and still valid."""
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None
    sessions: SessionStore = _state(request).sessions
    return await sessions.get(session_id)


async def authorize(request: Request, needed: Scope) -> Scope:
    """The scope of the request's key (or session), if it is at least `needed`; else raise Unauthenticated or
    Forbidden (the dependency of `authorized`, and `api.fastlane`'s check)."""
    state = _state(request)
    keyring: KeyRing = state.keyring
    header = request.headers.get("authorization")
    if header is not None:
        wrong_keys: WrongKeys = state.wrong_keys
        return wrong_keys.authorize(keyring, header, needed, client_address(request.scope))
    if COOKIE not in request.cookies:
        return keyring.authorize(header, needed)  # no key at all: says how to send one
    session = await current_session(request)
    if session is None:
        raise Unauthenticated("Your dashboard session has ended; sign in again.")
    if request.method not in SAFE_METHODS and not session.csrf_ok(request.headers.get(CSRF_HEADER)):
        raise Forbidden(f"Missing or wrong {CSRF_HEADER} header: a signed-in page sends it with every change.")
    if session.scope < needed:
        raise Forbidden("This key is read-only; loading and unloading models needs an operator key.")
    return session.scope


@cache
def authorized(scope: Scope) -> Callable[..., Awaitable[Scope]]:
    """The dependency that admits a key (or session) of at least `scope` (an operation's `Op.scope`). The two
    schemes are declared in the schema by `secured`, not as sub-dependencies: FastAPI would run both on every
    request for nothing (they read the same header and cookie as `authorize`), about 40 us each time."""

    async def check(request: Request) -> Scope:
        return await authorize(request, scope)

    check.__name__ = f"require_{scope.name.lower()}"
    return check


SECURITY: list[dict[str, list[str]]] = [{bearer_scheme.scheme_name: []}, {session_scheme.scheme_name: []}]
"""An operation's OpenAPI security requirement: either scheme will do."""


def secured(scope: Scope, openapi_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Route options that admit a key (or session) of at least `scope`, and say so in the schema (with the
    route's own `openapi_extra`)."""
    return {
        "dependencies": [Depends(authorized(scope))],
        "openapi_extra": {"security": SECURITY, **(openapi_extra or {})},
    }


def security_schemes() -> dict[str, Any]:
    """The schema's `components.securitySchemes` for `SECURITY`, as FastAPI writes them."""
    return {
        scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
        for scheme in (bearer_scheme, session_scheme)
    }


Settings = Annotated[ApiSettings, Depends(get_settings)]
Directory = Annotated[NodeDirectory, Depends(get_directory)]
Jobs = Annotated[JobClient, Depends(get_jobs)]
Relay = Annotated[EventRelay, Depends(get_relay)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]
Fleet = Annotated[Pool, Depends(get_pool)]
Proxy = Annotated[NodeProxy, Depends(get_proxy)]
Sessions = Annotated[SessionStore, Depends(get_sessions)]
CurrentSession = Annotated[Session | None, Depends(current_session)]
