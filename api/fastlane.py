"""The head's hottest routes, answered beneath FastAPI: `GET /api/v1/nodes/{fingerprint}/models` and the two
inference routes, `POST /v1/completions` and `POST /v1/chat/completions`.

A node's list is one job on one node, and the API's share of its round trip is what an operator feels; a prompt's
time to its first token is what a user feels. Around each, FastAPI adds its middleware stack, a match against
every route, a `Request` and the solving of its dependencies, a validation of the answer against its own model
and a `JSONResponse`: measured in one run of two heads over one fleet, 41% of the API's CPU per list (1.89 ms
with them, 1.11 ms without), more than the job; and 0.4-0.5 ms of a prompt's way to its node, a tenth of the
time to its first token through the head.

So the head answers these routes in a middleware, the outermost of its own but the body limit (inside Starlette's
error and FastAPI's telemetry middleware, above the others and the router), with the parts their FastAPI routes
use, in the same order, and any failure answered by the app's own exception handlers
(`api.errors.answer_exception`), so that its status, headers and body are the ones the rest of the API gives:

- the list: `api.deps.authorize` (key or session, throttling of wrong keys), `api.routes.nodes.node_models` (the
  node, then its job), the answer model serialized as FastAPI serializes it;
- a prompt: its body decoded and validated as FastAPI does it (`json.loads`, then the route's schema), then
  `authorize` and `api.routes.inference.proxied`. A body that FastAPI would refuse (not JSON, not the schema,
  not sent as `application/json`) is passed on to FastAPI as it came, and FastAPI's route answers it.

The FastAPI routes stay: they declare the routes in the OpenAPI schema and answer whatever the lane passes on
(HEAD, a request under a `root_path`; every request of an app built with `fast_lane=False`). The tests ask both
the same requests and compare the answers (tests/api/test_fastlane.py).

What the lane skips is what these routes never need: no query, no dependency with a cleanup; the list's one
path parameter is any segment, and a prompt's answer is the node's (`api.proxy.ProxyResponse`).
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import authorize
from api.errors import answer_exception
from api.routes import inference, nodes
from broker.body_limit import header
from broker.errors import RequestTooLarge
from broker.operations import LIST

_PATH, _, _CONVERTORS = compile_path(nodes.router.prefix + nodes.MODELS)


def _sends_json(scope: Scope) -> bool:
    """Whether the request's Content-Type is JSON as FastAPI reads it for a body (its other cases go to it)."""
    value = header(scope, b"content-type")
    return value is not None and value.split(b";", 1)[0].strip().lower() == b"application/json"


def _replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` once more from the start: `body` first, as one message, then whatever comes next."""
    pending = True

    async def again() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class FastLane:
    """Middleware answering the list and the inference routes itself; every other request goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            method = scope["method"]
            if method == "GET" and (matched := _PATH.match(scope["path"])) is not None:
                params: dict[str, Any] = {k: _CONVERTORS[k].convert(v) for k, v in matched.groupdict().items()}
                scope["path_params"] = params
                await self._list(Request(scope, receive), params["fingerprint"], send)
                return
            if method == "POST" and scope["path"] in inference.BODIES and _sends_json(scope):
                await self._prompt(Request(scope, receive), send)
                return
        await self.app(scope, receive, send)

    async def _list(self, request: Request, fingerprint: str, send: Send) -> None:
        state = request.app.state  # Starlette put the app in the scope

        async def answer() -> Response:
            await authorize(request, LIST.scope)
            result = await nodes.node_models(fingerprint, state.directory, state.jobs)
            return Response(result.model_dump_json(by_alias=True), media_type="application/json")

        await _answered(request, answer, send)

    async def _prompt(self, request: Request, send: Send) -> None:
        path = request.scope["path"]
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone before its body was in: nobody to answer
            return
        except RequestTooLarge as exc:  # `broker.body_limit`
            await _failed(request, exc, send)
            return
        try:
            body = inference.BODIES[path].model_validate(json.loads(raw))
        except Exception:  # not JSON, nested too deep, not the schema: FastAPI's route says so, in its words
            await self.app(request.scope, _replayed(raw, request.receive), send)
            return

        async def answer() -> Response:
            await authorize(request, inference.SCOPE)
            return await inference.proxied(request.app.state.proxy, body, request, path)

        await _answered(request, answer, send)


async def _answered(request: Request, answer: Callable[[], Awaitable[Response]], send: Send) -> None:
    """Send `answer()`'s response, or the app's answer to what it raised (unless the response had begun)."""
    started = False

    async def sending(message: Message) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        response = await answer()
        await response(request.scope, request.receive, sending)
    except Exception as exc:
        if started:  # nothing can be answered once the answer has begun: the server logs it
            raise
        await _failed(request, exc, send)


async def _failed(request: Request, exc: Exception, send: Send) -> None:
    response = await answer_exception(request, exc)
    await response(request.scope, request.receive, send)
