"""`/api/v1/session`: the dashboard signs in with an API key, reads its session, and signs out.

The key travels once, in the sign-in request's body; the answer sets an HttpOnly, SameSite=Strict cookie
(Secure when the page came over HTTPS) holding a random session id, and gives the page the scope and CSRF token
it needs. See `api.sessions`.
"""

import logging
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.alias_generators import to_camel

from api.deps import CurrentSession, Sessions, Settings
from api.errors import documented
from api.sessions import COOKIE, CSRF_HEADER, Session
from broker.auth import Scope
from broker.errors import BrokerUnavailable, Forbidden, InvalidRequest, TooManyWrongKeys, Unauthenticated
from broker.wrong_keys import WrongKeys, client_address

log = logging.getLogger("modelfleet.api")

router = APIRouter(prefix="/api/v1/session", tags=["session"])
AUTH_ERRORS = documented(Unauthenticated, Forbidden, InvalidRequest, BrokerUnavailable)
SIGN_IN_ERRORS = documented(Unauthenticated, Forbidden, TooManyWrongKeys, InvalidRequest, BrokerUnavailable)


class SignIn(BaseModel):
    """The key to sign in with. It is checked and forgotten: only a session id is handed back, in a cookie."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=1, max_length=4096)


class SessionInfo(BaseModel):
    """What the signed-in page may do, and the token it sends in `X-CSRF-Token` with every change."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    scope: Literal["read", "operator"]
    can_operate: bool
    csrf_token: str
    csrf_header: str = CSRF_HEADER
    idle_timeout_seconds: float


def _info(session: Session, settings: Settings) -> SessionInfo:
    return SessionInfo(
        scope="operator" if session.scope >= Scope.OPERATOR else "read",
        can_operate=session.scope >= Scope.OPERATOR,
        csrf_token=session.csrf_token,
        idle_timeout_seconds=settings.session_ttl,
    )


def _same_origin(request: Request) -> bool:
    """A browser names the page that sent a request in `Origin`; a sign-in from another site's page is refused
    (it would sign the operator's browser in with the other site's key)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request (curl, scripts)
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


@router.post("", responses=SIGN_IN_ERRORS, summary="Sign in to the dashboard")
async def sign_in(
    body: SignIn, request: Request, response: Response, sessions: Sessions, settings: Settings
) -> SessionInfo:
    """Sign in with an API key: sets the session cookie and answers the session's scope and CSRF token."""
    if not _same_origin(request):
        raise Forbidden("Sign-in is only accepted from the dashboard's own page.")
    wrong_keys: WrongKeys = request.app.state.wrong_keys
    key = body.key.get_secret_value()
    # Judged before a session exists: a key right but new to an address that sent too many wrong ones gets none.
    if request.app.state.keyring.identify(key) is None:
        wrong_keys.wrong(client_address(request.scope))
        raise Unauthenticated("Invalid API key.")
    wrong_keys.right(client_address(request.scope), key)
    created = await sessions.create(key)
    if created is None:  # not reached: the key was right just above, and nothing awaited since
        raise Unauthenticated("Invalid API key.")
    session_id, session = created
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    client = request.client.host if request.client else "?"
    log.info(
        "dashboard sign-in with a %s key from %s",
        "operator" if session.scope >= Scope.OPERATOR else "read-only",
        client,
    )
    return _info(session, settings)


@router.get("", responses=AUTH_ERRORS, summary="Show the dashboard session")
async def get_session(session: CurrentSession, settings: Settings) -> SessionInfo:
    """The session the cookie holds; 401 once it ended (idle too long, signed out, or its key removed)."""
    if session is None:
        raise Unauthenticated("Not signed in.")
    return _info(session, settings)


@router.delete("", status_code=204, responses=AUTH_ERRORS, summary="Sign out of the dashboard")
async def sign_out(request: Request, session: CurrentSession, sessions: Sessions) -> Response:
    """Sign out: ends the session and clears the cookie. Needs the CSRF token, like every change."""
    if session is not None:
        if not session.csrf_ok(request.headers.get(CSRF_HEADER)):
            raise Forbidden(f"Missing or wrong {CSRF_HEADER} header: a signed-in page sends it with every change.")
        await sessions.end(request.cookies[COOKIE])
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response
