"""The node's inference endpoint: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

A small FastAPI app served by uvicorn on a thread of the worker process (`NodeServer`), beside Celery. Every
call needs `Authorization: Bearer <key>`: one of the fleet's API keys (either scope) or the node token that the
head uses. Each request runs in a thread of its own (`InferenceRunner`); the route waits for its first event, so
a request that cannot start (unknown model, full queue, prompt too long) gets a proper status and OpenAI's error
body, and only a started one answers 200. Once a stream has started, a failure is sent as an error event (`data:
{"error": {...}}`) followed by `data: [DONE]`. A client that disconnects, queued or streaming, stops its request:
within one token, and its place or the model is free at once for the next one.
"""

import asyncio
import json
import logging
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette import types as asgi
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import __version__
from broker import errors as e
from broker.auth import KeyRing, Scope
from broker.body_limit import BodyLimit
from broker.openai import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ModelCard,
    ModelCardList,
    chat_completion_id,
    completion_id,
    created_now,
    error_body,
    sse_data,
)
from broker.settings import MAX_BODY_BYTES
from broker.status import error_headers, status_of
from broker.wrong_keys import WrongKeys, client_address
from workers.inference.channel import Channel
from workers.inference.runner import Delta, Event, Failed, Finished, InferenceRequest, InferenceRunner, Started
from workers.inference.threads import ThreadCache
from workers.manager import ModelManager
from workers.settings import DEFAULT_STREAM_INTERVAL

log = logging.getLogger(__name__)


def error_response(error: e.ModelfleetError) -> JSONResponse:
    status = status_of(error, openai=True)  # every route of the node is in OpenAI's shape
    body = error_body(status, error.code, error.message)
    return JSONResponse(body.model_dump(), status_code=status, headers=error_headers(error, status))


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "Bad parameters: n > 1, a prompt plus max_tokens beyond the context, a chat template error"),
        (401, "No key, or not one of the fleet's"),
        (404, "The model is not loaded on this node"),
        (422, "The body does not match the schema"),
        (429, "The model's queue is full, or this address sent too many wrong keys; retry after Retry-After s"),
    ]
}
BODY_ERRORS = {**ERRORS, 413: {"model": ErrorBody, "description": "The body is over MODELFLEET_MAX_BODY_BYTES"}}
"""The answers of a route that reads a body (`broker.body_limit`)."""


def create_node_app(
    manager: ModelManager,
    keyring: KeyRing,
    *,
    wrong_keys: WrongKeys,
    stream_interval: float = DEFAULT_STREAM_INTERVAL,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The endpoint of one node's models; `wrong_keys` counts its callers' wrong keys; `stream_interval` as in
    `_stream`."""
    runner = InferenceRunner(manager)
    threads = ThreadCache("modelfleet-generate")
    app = FastAPI(title="modelfleet node", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    async def authorize(request: Request, authorization: Annotated[str | None, Header()] = None) -> Scope:
        # A coroutine although it never waits: FastAPI would run a plain `def` in its thread pool, a thread hop
        # per request.
        return wrong_keys.authorize(keyring, authorization, Scope.READ, client_address(request.scope))

    Caller = Annotated[Scope, Depends(authorize)]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelCardList, responses=ERRORS)
    async def list_models(_: Caller) -> ModelCardList:
        """The models on this node, with OpenAI's fields (`object`, `created`, `owned_by`)."""
        cards = [
            ModelCard(**m.model_dump(), created=int(m.loaded_at.timestamp()) if m.loaded_at else 0)
            for m in manager.models()
        ]
        return ModelCardList(data=cards)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=BODY_ERRORS)
    async def completions(body: CompletionRequest, request: Request, _: Caller) -> Response:
        """Continue a prompt; with `stream: true`, Server-Sent Events of `text_completion` chunks."""
        return await _serve(runner, threads, request, body, stream_interval)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=BODY_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: Caller) -> Response:
        """Answer a conversation, rendered with the model's chat template; with `stream: true`, SSE chunks."""
        return await _serve(runner, threads, request, body, stream_interval)

    _install_error_handlers(app)
    return app


async def _serve(
    runner: InferenceRunner, threads: ThreadCache, request: Request, body: InferenceRequest, interval: float
) -> Response:
    problem = body.unsupported()
    if problem:
        raise e.InvalidRequest(problem)
    events: Channel[Event] = Channel(asyncio.get_running_loop())
    relay = _Relay(events, stream=bool(body.stream))
    cancelled = threading.Event()

    def cancel() -> None:
        relay.written()  # a generation waiting for a write that will not come goes on, and sees it is cancelled
        runner.cancel(cancelled)

    threads.submit(lambda: runner.run(body, relay.emit, cancelled))
    # Nothing else reads the connection: watch it, so a caller that leaves (queued, waiting for an answer that
    # is not streamed, or mid-stream) stops its request. A stream's watch ends with the stream.
    watcher = asyncio.create_task(_on_disconnect(request, cancel))
    streaming = False
    try:
        first = await events.get()
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Started)
        if not body.stream:
            return await _whole(body, first, events)
        streaming = True
    except BaseException:
        cancel()
        raise
    finally:
        if not streaming:
            watcher.cancel()
    return _EventStream(
        _stream(body, events, cancel, interval, relay.written, watcher),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _EventStream(StreamingResponse):
    """A StreamingResponse without the task group that Starlette starts for each one to notice a disconnect
    (uvicorn speaks ASGI 2.3, where a write to a gone client does not fail): `_serve`'s own watch of the
    connection does that, and stops the generation, which ends the stream. Measured: 0.1 ms less of the node's
    CPU per streamed request (1.27 -> 1.17 ms for a one-token stream)."""

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        await self.stream_response(send)


FIRST_WRITE_WAIT = 0.05
"""The longest a generation waits for its stream's first write (`_Relay`); it usually takes about a millisecond."""


class _Relay:
    """The generation thread's `emit`, and what the stream calls once its first write is out (`written`).

    For a stream, the generation waits (at most FIRST_WRITE_WAIT) after its first token until the stream has
    written it, before it makes the next. A generation that runs on at once takes the GIL back between its
    native calls while the event loop needs it to write: measured on 2 CPUs, the first token of a 200-token
    answer left the node 2.5 ms later than that of a 1-token answer. Waiting costs the generation the time of
    one write, once per request. `Started` goes out as it comes, so a stream's status and headers do not wait
    for the prompt's evaluation (the head's read timeout runs from them).
    """

    def __init__(self, events: Channel[Event], *, stream: bool) -> None:
        self._events = events
        self._first = stream  # a stream's first token is still to come
        self._written = threading.Event()

    def emit(self, event: Event) -> None:
        self._events.put(event, last=isinstance(event, Finished | Failed))
        if self._first and isinstance(event, Delta):
            self._first = False
            self._written.wait(FIRST_WRITE_WAIT)

    def written(self) -> None:
        if not self._written.is_set():  # called after every write: only the first one sets it
            self._written.set()


async def _on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


async def _whole(body: InferenceRequest, started: Started, events: Channel[Event]) -> Response:
    parts: list[str] = []
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, Finished):
            break
    text = "".join(parts)
    answer: CompletionResponse | ChatCompletionResponse
    if isinstance(body, ChatCompletionRequest):
        answer = ChatCompletionResponse(
            id=chat_completion_id(),
            created=created_now(),
            model=body.model,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=event.finish_reason)],
            usage=event.usage,
        )
    else:
        answer = CompletionResponse(
            id=completion_id(),
            created=created_now(),
            model=body.model,
            choices=[CompletionChoice(text=text, finish_reason=event.finish_reason)],
            usage=event.usage,
        )
    return Response(answer.model_dump_json(), media_type="application/json")


class _DeltaFrames:
    """The SSE frame of one token's text, made from the chunk model serialized once: the frames of a stream
    differ only in their text, so each one is that text's JSON between a fixed head and tail. The chunk model is
    the schema; this is only the cheap way to print it many times (a few microseconds a token instead of a
    model built and dumped)."""

    MARK = "modelfleet-delta-6c1f0e2a"

    def __init__(self, template: BaseModel) -> None:
        self._head, self._tail = sse_data(template).rsplit(json.dumps(self.MARK).encode(), 1)  # after id and model

    def __call__(self, text: str) -> bytes:
        return self._head + json.dumps(text, ensure_ascii=False).encode() + self._tail


async def _stream(
    body: InferenceRequest,
    events: Channel[Event],
    cancel: Callable[[], None],
    interval: float,
    written: Callable[[], None],
    watcher: "asyncio.Task[None]",
) -> AsyncIterator[bytes]:
    """The SSE body. The first token goes out the moment it is generated; after that, writes are at least
    `interval` seconds apart, and each carries the text generated since the last one as one event. The end of
    the generation does not wait for the interval: the last text, the finish and `[DONE]` go out at once.

    A model slower than one token an `interval` (any model people chat with: 10 ms is 100 tokens a second)
    still gets one event per token, each written as soon as it exists. A faster one would otherwise cost a
    write, a JSON event and a wake-up of the head and the client per token, which on a small machine is CPU
    taken from the generation itself (stories260K streamed at 0.65x its in-process speed that way); batched,
    its tokens arrive at most `interval` late. vLLM's and SGLang's `--stream-interval` make the same trade,
    counted in tokens; OpenAI's own streams do not promise a token per event either. 0: one event per token,
    each written at once (those that pile up while a write goes out share the next write).
    """
    chat = isinstance(body, ChatCompletionRequest)
    ident, created = (chat_completion_id() if chat else completion_id()), created_now()

    def chunk(text: str | None, finish: Any = None, *, role: bool = False) -> bytes:
        if chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            return sse_data(
                ChatCompletionChunk(
                    id=ident,
                    created=created,
                    model=body.model,
                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                )
            )
        choice = CompletionChoice(text=text or "", finish_reason=finish)
        return sse_data(CompletionResponse(id=ident, created=created, model=body.model, choices=[choice]))

    if chat:
        template: BaseModel = ChatCompletionChunk(
            id=ident,
            created=created,
            model=body.model,
            choices=[ChatChunkChoice(delta=ChatDelta(content=_DeltaFrames.MARK))],
        )
    else:
        choice = CompletionChoice(text=_DeltaFrames.MARK, finish_reason=None)
        template = CompletionResponse(id=ident, created=created, model=body.model, choices=[choice])
    delta = _DeltaFrames(template)

    def frame(event: Finished | Failed) -> bytes:
        """The bytes that end the stream."""
        if isinstance(event, Failed):
            status = status_of(event.error, openai=True)
            return sse_data(error_body(status, event.error.code, event.error.message)) + SSE_DONE
        assert isinstance(event, Finished)
        closing = chunk("" if not chat else None, event.finish_reason)
        if body.include_usage:
            usage: ChatCompletionChunk | CompletionResponse
            if chat:
                usage = ChatCompletionChunk(id=ident, created=created, model=body.model, choices=[])
            else:
                usage = CompletionResponse(id=ident, created=created, model=body.model, choices=[])
            closing += sse_data(usage.model_copy(update={"usage": event.usage}))
        else:
            # A comment, which clients skip (SSE), for the head's tokens per second: an event can carry several
            # tokens, so the head cannot count them from the events.
            closing += b': {"completion_tokens":%d}\n\n' % event.usage.completion_tokens
        return closing + SSE_DONE

    try:
        loop = asyncio.get_running_loop()
        wrote = -interval
        ended = False
        parts: list[bytes] = [chunk("", role=True)] if chat else []  # OpenAI's first chunk names the role
        while not ended:
            batch = [await events.get()]
            wait = wrote + interval - loop.time()
            if wait > 0:
                await events.pause(wait)  # the end of the stream cuts it short
            while not events.empty():
                batch.append(events.get_nowait())
            texts: list[str] = []
            for event in batch:
                if isinstance(event, Delta):
                    if interval:
                        texts.append(event.text)
                    else:
                        parts.append(delta(event.text))
                    continue
                if texts:
                    parts.append(delta("".join(texts)))
                    texts = []
                assert isinstance(event, Finished | Failed)  # Started came before the stream began
                parts.append(frame(event))
                ended = True
            if texts:
                parts.append(delta("".join(texts)))
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts = []
            written()
            wrote = loop.time()
    finally:
        watcher.cancel()
        cancel()  # a no-op once finished; a disconnected client's generation stops here


def _install_error_handlers(app: FastAPI) -> None:
    async def modelfleet_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, e.ModelfleetError)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems, fields = [], []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            fields.append(where or "body")
            problems.append(f"{where}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
        # `param` names the first field, as the head's answer does (OpenAI's own 400s name it there too).
        message = "; ".join(problems) or "Invalid request."
        body = error_body(422, "invalid_request", message, fields[0] if fields else None)
        return JSONResponse(body.model_dump(), status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, e.RequestTooLarge):  # FastAPI's 400 for a body read that failed (`BodyLimit`)
            return error_response(exc.__cause__)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_body(exc.status_code, code, str(exc.detail))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        ref = uuid.uuid4().hex[:12]
        log.exception("unexpected error %s serving %s %s", ref, request.method, request.url.path)
        body = error_body(500, "internal_error", f"Internal error (reference {ref}); the node's log has the details.")
        return JSONResponse(body.model_dump(), status_code=500)

    app.add_exception_handler(e.ModelfleetError, modelfleet_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


DEFAULT_PORT = 8081


def bind(host: str, port: int | None) -> socket.socket:
    """Bind the listening socket now, so that the port is known before the node registers.

    `port` None: `DEFAULT_PORT`, or any free port if that one is taken; 0: any free port. Raises OSError naming
    the address when a given port cannot be had.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in [DEFAULT_PORT, 0] if port is None else [port]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if port is None and candidate == DEFAULT_PORT:
                log.info("port %d is taken; the inference endpoint takes a free one", DEFAULT_PORT)
                continue
            raise OSError(
                f"the inference endpoint cannot listen on {host}:{candidate} ({exc.strerror}); "
                "pick another --serve-port (0: any free one) or --serve-host"
            ) from exc
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    raise AssertionError("unreachable: port 0 always binds")


class NodeServer:
    """uvicorn on a thread of the worker process (Celery keeps the main thread), on an already bound socket."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self._sock = sock
        # At shutdown, open streams get a few seconds, not forever: the models go away with the process anyway.
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=3,
            # A node's callers reach it directly (the head, clients): no proxy names their address for them, and
            # uvicorn's default would let any local process name one in X-Forwarded-For (`broker.wrong_keys`).
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="modelfleet-inference", daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception:
            log.exception("the inference endpoint stopped")

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
