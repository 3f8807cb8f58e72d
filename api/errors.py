"""One table from error class to HTTP status, and the handlers that give every failure one JSON shape:

{"success": false, "error": "<a sentence a person can act on>", "code": "<stable code>", "details": {...}}
"""

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import AuthenticationError, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import errors as e

log = logging.getLogger(__name__)

STATUS: dict[type[e.ModelfleetError], int] = {
    e.InvalidRequest: 422,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.NodeNotFound: 404,
    e.NodeUnavailable: 503,
    e.BrokerUnavailable: 503,
    e.ShuttingDown: 503,
    e.JobTimeout: 504,
    e.NodeError: 502,
    e.ModelFileNotFound: 404,
    e.ModelNotLoaded: 404,
    e.PathOutsideModelsDir: 422,
    e.InvalidModelFile: 422,
    e.ModelLoadFailed: 422,
    e.InsufficientMemory: 409,
    e.JobExpired: 504,
    e.InternalError: 500,
    e.ModelfleetError: 500,
}


def status_of(error: e.ModelfleetError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"success": False, "error": message, "code": code, "details": details or {}}


async def _modelfleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ModelfleetError)
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status, headers=headers)


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [{"field": _describe(err).split(":")[0], "message": _describe(err)} for err in exc.errors()]
    message = "; ".join(p["message"] for p in problems[:5]) or "Invalid request."
    return JSONResponse(error_body("invalid_request", message, {"errors": problems}), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable while serving %s %s: %s", request.method, request.url.path, type(exc).__name__)
    if isinstance(exc, AuthenticationError):
        message = "Redis refused the API's credentials; the operator must fix MODELFLEET_REDIS_URL."
    else:
        message = "Redis, which carries every job, cannot be reached; try again shortly."
    body = error_body("broker_unavailable", message)
    return JSONResponse(body, status_code=503)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.exception("unexpected error %s serving %s %s", ref, request.method, request.url.path)
    body = error_body("internal_error", f"Internal error (reference {ref}); the server log has the details.")
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.ModelfleetError, _modelfleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _unexpected)
