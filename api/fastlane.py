"""The head's hottest read, answered beneath FastAPI: `GET /api/v1/nodes/{fingerprint}/models`.

A node's list is one job on one node, and the API's share of its round trip is what an operator feels. Around
that job FastAPI adds its middleware stack, a match against every route, a `Request` and the solving of its
dependencies, a validation of the answer against its own model and a `JSONResponse`: measured in one run of two
heads over one fleet, 41% of the API's CPU per list (1.89 ms with them, 1.11 ms without), more than the job.

So the head answers this one route in a middleware, the outermost of its own (inside Starlette's error and
FastAPI's telemetry middleware, above the others and the router), with the parts its FastAPI route uses, in the
same order: `api.deps.authorize` (key or session, throttling of wrong keys), `api.routes.nodes.node_models`
(the node, then its job), the answer model serialized as FastAPI serializes it, and any failure answered by the
app's own exception handlers (`api.errors.answer_exception`), so that its status, headers and body are the ones
the rest of the API gives. The FastAPI route stays: it declares the route in the OpenAPI schema and answers
whatever the lane passes on (HEAD, a request under a `root_path`; every request of an app built with
`fast_lane=False`). The tests ask both the same requests and compare the answers (tests/api/test_fastlane.py).

What the lane skips is what this route never needs: it has no body, no query, no dependency with a cleanup, and
its one path parameter is any segment.
"""

from typing import Any

from fastapi import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import authorize
from api.errors import answer_exception
from api.routes import nodes
from broker.operations import LIST

_PATH, _, _CONVERTORS = compile_path(nodes.router.prefix + nodes.MODELS)


class FastLane:
    """Middleware answering `GET /api/v1/nodes/{fingerprint}/models` itself; every other request goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = None
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            matched = _PATH.match(scope["path"])
        if matched is None:
            await self.app(scope, receive, send)
            return
        params: dict[str, Any] = {k: _CONVERTORS[k].convert(v) for k, v in matched.groupdict().items()}
        scope["path_params"] = params
        request = Request(scope, receive)
        state = request.app.state  # Starlette put the app in the scope
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await authorize(request, LIST.scope)
            result = await nodes.node_models(params["fingerprint"], state.directory, state.jobs)
            response = Response(result.model_dump_json(by_alias=True), media_type="application/json")
            await response(scope, receive, sending)
        except Exception as exc:
            if started:  # nothing can be answered once the answer has begun: the server logs it
                raise
            response = await answer_exception(request, exc)
            await response(scope, receive, send)
