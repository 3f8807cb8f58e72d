"""One table from error class to HTTP status, for every HTTP server of the fleet: the head (`api.errors`) and
each node's inference endpoint (`workers.inference.server`), so that a failure answers the same status wherever
a client meets it, and the head's OpenAPI schema (documented from this table) holds for what the nodes answer.

A subclass without a row of its own answers its nearest parent's status. On OpenAI's routes (the head's
`/v1/completions` and `/v1/chat/completions`, and every route of a node) a request that will not run is 400, as
OpenAI answers it, where the head's own routes answer 422: `status_of(error, openai=True)`.
"""

from broker import errors as e

STATUS: dict[type[e.ModelfleetError], int] = {
    e.InvalidRequest: 422,
    e.RequestTooLarge: 413,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.TooManyWrongKeys: 429,
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
    e.ModelBusy: 429,
    e.GenerationFailed: 502,
    e.InternalError: 500,
    e.ModelfleetError: 500,
}


def status_of(error: e.ModelfleetError | type[e.ModelfleetError], *, openai: bool = False) -> int:
    """The status `error` (an instance or a class) answers; `openai`: on a route in OpenAI's shape."""
    cls = error if isinstance(error, type) else type(error)
    status = next((STATUS[parent] for parent in cls.__mro__ if parent in STATUS), 500)
    return 400 if openai and status == 422 else status


def error_headers(error: e.ModelfleetError, status: int) -> dict[str, str]:
    """The headers an error's answer carries, on every server: how to authenticate with a 401, and when to come
    back with a `retry_after` (a full queue, too many wrong keys)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if "retry_after" in error.details:
        headers["Retry-After"] = str(error.details["retry_after"])
    return headers
