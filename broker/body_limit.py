"""The largest request body the fleet's HTTP servers read (the head, and each node's inference endpoint).

Without a limit, one client could make a server buffer a body of any size: FastAPI reads a whole body before it
validates it. `BodyLimit`, plain ASGI middleware, counts the body as the app reads it and fails the read with
`RequestTooLarge` once the body passes the limit, or at the first read when its Content-Length already says so:
nothing more of it is read, and the route never runs. Requests of the methods without a body in this API (GET,
HEAD, DELETE...) are left alone: no route reads theirs.

FastAPI reports a failed body read as its own 400 ("There was an error parsing the body") caused by the error, so
each server's handler of HTTP errors answers that cause instead (`api.errors`, `workers.inference.server`): 413
`request_too_large`, in its routes' shape. Starlette's `RequestBodyLimitMiddleware` (FastAPI's `max_body_size`)
would answer a declared oversize body with a plain-text 413 of its own, whatever the app's handlers say.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from broker.errors import RequestTooLarge

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""The methods whose body a route reads. The other requests' routes read none: they only listen for the client
leaving (an event stream), which discards what a client sends without holding it, and must not be failed."""


def header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    """The value of the request's first header called `name` (lower case, as ASGI gives names), if any."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _declared_length(scope: MutableMapping[str, Any]) -> int | None:
    value = header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the HTTP server refuses such a request before it reaches the app


class BodyLimit:
    """ASGI middleware: reads of the request body fail with `RequestTooLarge` past `limit` bytes."""

    def __init__(self, app: App, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = _declared_length(scope)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared > limit:  # nothing of it is read
                raise RequestTooLarge.over(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge.over(limit)
            return message

        await self.app(scope, limited, send)
