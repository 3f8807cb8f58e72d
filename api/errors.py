"""The handlers that give every failure one JSON shape:

{"success": false, "error": "<a sentence a person can act on>", "code": "<stable code>", "details": {...}}

(`broker.answers.ErrorBody`), except where only openai-python calls (`speaks_openai`: inference, one model's
entry, any other path under `/v1` but the pool's routes of model-loading.txt), where the same failures take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`broker.openai.ErrorBody`), which openai-python
reads. `GET /v1/models` is both openai-python's `models.list` and the pool's listing: it keeps the API's shape,
which the pool's clients read (openai-python still raises the right exception for its status).

The statuses come from one table, `broker.status`, which the nodes' inference endpoints answer by too; the same
table documents the routes: `documented(...)` turns the errors a route can answer into its OpenAPI `responses`,
so the schema cannot drift from the handler.
"""

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import errors as e
from broker.answers import ErrorBody
from broker.connection import redis_problem
from broker.openai import ErrorBody as OpenAIErrorBody
from broker.openai import error_body as openai_error
from broker.status import STATUS, error_headers, status_of

log = logging.getLogger(__name__)

POOL_ROUTES = frozenset(
    {"/v1/models", "/v1/models/status", "/v1/models/load", "/v1/models/unload", "/v1/models/unload-all"}
)
"""The pool's routes under `/v1` (model-loading.txt): they answer errors in the API's shape."""


POOL_ACTIONS = frozenset({"/v1/models/load", "/v1/models/unload", "/v1/models/unload-all"})
"""The pool's POST routes: a GET of one asks for a model of that name (openai-python's `models.retrieve`)."""


def speaks_openai(path: str, method: str) -> bool:
    """Whether errors of `method` at `path` take OpenAI's shape: everything under `/v1` but the pool's routes
    (completions, chat, `models.retrieve`, and any path openai-python has and the head does not, as a 404)."""
    if not path.startswith("/v1/"):
        return False
    if path in POOL_ACTIONS and method in ("GET", "HEAD"):
        return True  # `models.retrieve("load")`: a model id, whose 404 openai-python must be able to read
    return path not in POOL_ROUTES


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return ErrorBody(error=message, code=code, details=details or {}).model_dump(mode="json")


def _answered_as(cls: type[e.ModelfleetError]) -> list[type[e.ModelfleetError]]:
    """`cls` and the subclasses answered under its status (a subclass with a status of its own is not)."""
    found = [cls]
    for sub in cls.__subclasses__():
        if sub not in STATUS:
            found += _answered_as(sub)
    return found


def documented(
    *errors: type[e.ModelfleetError], streaming: bool = False, openai: bool = False
) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer `errors` (and any bug, as `internal_error`).

    `streaming`: the route's own media type is not JSON, and FastAPI would file the error bodies under it; they
    are JSON all the same (the `ErrorBody` schema is registered by the other routes). `openai`: the route answers
    errors in OpenAI's shape, with 400 where the others answer 422 (see `_modelfleet_error`).
    """
    by_status: dict[int, list[type[e.ModelfleetError]]] = {}
    for error in (*errors, e.InternalError):
        for cls in _answered_as(error):
            status = status_of(cls, openai=openai)
            classes = by_status.setdefault(status, [])
            if cls not in classes:
                classes.append(cls)
    if openai and e.InvalidRequest in errors:
        by_status[422] = [e.InvalidRequest]  # a body that fails validation (`_validation_error`)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, classes in sorted(by_status.items()):
        lines = "\n".join(f"- `{cls.code}`: {(cls.__doc__ or '').strip()}" for cls in classes)
        described: dict[str, Any] = {"description": f"The error's `code` is one of:\n\n{lines}"}
        if streaming:
            described["content"] = {"application/json": {"schema": ERROR_REF}}
        else:
            described["model"] = OpenAIErrorBody if openai else ErrorBody
        if status == 401:
            described["headers"] = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
        if status == 429:  # every 429 says when to come back (`error_headers`)
            described["headers"] = {
                "Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}
            }
        responses[status] = described
    return responses


ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def _answer(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The error in the shape the route's clients read."""
    if speaks_openai(request.url.path, request.method):
        body = openai_error(status, code, message, param).model_dump(mode="json")
    else:
        body = error_body(code, message, details)
    return JSONResponse(body, status_code=status, headers=headers)


async def _modelfleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ModelfleetError)
    status = status_of(exc, openai=speaks_openai(request.url.path, request.method))
    return _answer(request, status, exc.code, exc.message, exc.details, error_headers(exc, status))


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


JSON_BODY = "the body must be JSON with Content-Type: application/json"
_JSON_TYPES = {list: "an array", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _body_problem(err: dict[str, Any], body: Any) -> str | None:
    """A sentence for a body that is not a JSON object at all (pydantic's words speak of its own types)."""
    loc = tuple(err.get("loc", ()))
    if loc[:1] != ("body",):
        return None
    if err.get("type") == "json_invalid":
        reason = str(err.get("ctx", {}).get("error", "")).rstrip(".")
        where = _line_column(body, loc[1]) if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"the body is not valid JSON{where}" + (f" ({reason})" if reason else "")
    if len(loc) != 1:
        return None
    if err.get("type") == "missing":
        return "the body is missing: it must be JSON with Content-Type: application/json"
    if isinstance(err.get("input"), bytes | bytearray | str):  # FastAPI did not parse it: not declared as JSON
        return JSON_BODY
    if err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return f"the body must be a JSON object, not {_JSON_TYPES.get(type(err.get('input')), 'that')}"
    return None


def _line_column(body: Any, position: int) -> str:
    """Where in `body` a JSON parser stopped, as line and column (as `json.JSONDecodeError` counts them)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else body
    if not isinstance(text, str) or not 0 <= position <= len(text):
        return ""
    line = text.count("\n", 0, position) + 1
    return f" at line {line} column {position - text.rfind(chr(10), 0, position)}"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        sentence = _body_problem(err, exc.body)
        if sentence is not None:
            details = {"errors": [{"field": "body", "message": sentence}]}
            return _answer(request, 422, "invalid_request", f"Invalid request: {sentence}.", details, param="body")
    problems = [{"field": _describe(err).split(":")[0], "message": _describe(err)} for err in exc.errors()]
    message = "; ".join(p["message"] for p in problems[:5]) or "Invalid request."
    # Where clients read OpenAI's shape, as the nodes answer it: 422, the first field named.
    if speaks_openai(request.url.path, request.method):
        return _answer(request, 422, "invalid_request", message, param=problems[0]["field"] if problems else None)
    return JSONResponse(error_body("invalid_request", message, {"errors": problems}), status_code=422)


FASTAPI_BODY_ERROR = "There was an error parsing the body"
"""FastAPI's 400 for a body it could not even decode (not UTF-8, nested deeper than Python's recursion limit, a
number of more than 4,300 digits); answered as any other bad body."""


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, e.RequestTooLarge):  # FastAPI's 400 for a body read that failed (`BodyLimit`)
        return await _modelfleet_error(request, exc.__cause__)
    if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
        sentence = "the body could not be read as JSON (not UTF-8 text, nested too deep, or a number too long)"
        details = {"errors": [{"field": "body", "message": sentence}]}
        return _answer(request, 422, "invalid_request", f"Invalid request: {sentence}.", details, param="body")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    # Starlette's own words for a path or method no route has say nothing a person can act on
    route = f"{request.method} {request.url.path[:100]!r}"
    message = {
        "Not Found": f"No route answers {route}; /docs lists this API's routes.",
        "Method Not Allowed": f"{route}: this path takes other methods (the Allow header lists them).",
    }.get(str(exc.detail), str(exc.detail))
    return _answer(request, exc.status_code, code, message, headers=exc.headers)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable while serving %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return _answer(request, 503, "broker_unavailable", f"{redis_problem(exc)}; try again shortly.")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.exception("unexpected error %s serving %s %s", ref, request.method, request.url.path)
    return _answer(request, 500, "internal_error", f"Internal error (reference {ref}); the server log has the details.")


class AnswerUnexpected:
    """Answers an unexpected exception with the `internal_error` body itself.

    Starlette sends a handler's answer for `Exception` from its outermost ServerErrorMiddleware and then raises
    the exception again, for the server to log; uvicorn then closes the connection, so a keep-alive client's
    next request on it fails with ECONNRESET. Caught here, inside that middleware, the 500 is an answer like
    any other and the connection stays usable. (After a response has started nothing can be answered: that
    exception goes on to the server.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


async def answer_exception(request: Request, exc: Exception) -> Response:
    """The answer the app gives `exc` when a route raises it: its registered handler's (looked up along the
    exception's classes, as Starlette does), or `internal_error` (`api.fastlane`, which runs beneath them)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](request, exc)
    return await _unexpected(request, exc)


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(e.ModelfleetError, _modelfleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_middleware(AnswerUnexpected)
