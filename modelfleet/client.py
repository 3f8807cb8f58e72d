"""A Python client for the modelfleet API over httpx: `Client` (sync) and `AsyncClient` (asyncio).

    from modelfleet.client import Client

    with Client("http://head:8000", key) as fleet:      # or MODELFLEET_URL / MODELFLEET_KEY
        node = fleet.resolve_node("gpu-1")               # a fingerprint, a unique prefix of one, or a name
        fleet.load(node.fingerprint, "llama-3-8b", context_length=4096)
        print(fleet.node_models(node.fingerprint))

Prompts run through the head on whichever node has the model (`complete`, `chat`, and `stream` for the text as
it is generated):

        print(fleet.complete("stories260K", "Once upon a time", max_tokens=20, temperature=0).choices[0].text)
        for text in fleet.stream("stories260K", "Once upon a time"):
            print(text, end="", flush=True)

`AsyncClient` has the same methods, awaited. Every endpoint is written once, in `Endpoints`, as a method that
builds a `Call`: the HTTP request and how to read its answer. The two clients differ only in `_execute`, which
sends a call with httpx.Client or httpx.AsyncClient; the `endpoint` descriptor gives each client its methods
with the right signature (plain or awaitable) for type checkers. The one streaming endpoint, `events`, is a
generator on each client around the shared `modelfleet.sse.SseDecoder`; it resumes a lost stream after the last
event id it received, as a browser's EventSource does.

Everything the client raises derives from `ModelfleetClientError`:

    ModelfleetClientError          a message a person can act on, and a stable `code` (`invalid_url` here)
    ├── ModelfleetAPIError         the API answered an error: its `code`, HTTP `status`, message and `details`
    ├── ModelfleetConnectionError  the API could not be reached
    │   └── ModelfleetTimeout      ... or did not answer in time
    ├── UnexpectedResponse         an answer this client cannot read (another version?)
    └── NodeReferenceError         a node reference matches no node (`node_not_found`) or several (`ambiguous_node`)

This module imports `broker` (schemas and the error tree) but never `workers`: it works without ctransformers.
"""

import asyncio
import functools
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from broker.answers import (
    Health,
    NodeList,
    PoolLoadResult,
    PoolModelList,
    PoolStatus,
    PoolUnloadAllResult,
    PoolUnloadResult,
)
from broker.errors import ERRORS_BY_CODE, ModelfleetError
from broker.openai import ChatCompletionResponse, CompletionResponse
from broker.operations import CATALOG, LIST, LOAD, UNLOAD, UNLOAD_ALL
from broker.schemas import LoadResult, ModelInfo, NodeCatalog, NodeInfo, UnloadAllResult, UnloadResult
from modelfleet.sse import SseDecoder, StreamEvent

DEFAULT_URL = "http://127.0.0.1:8000"
"""Where `modelfleet up` serves the API."""
TIMEOUT = 30.0
"""Seconds to wait for a read (nodes, lists, status)."""
JOB_TIMEOUT = 900.0
"""Seconds to wait for a load or unload: above the API's own deadlines (600 s for a load by default)."""
CONNECT_TIMEOUT = 5.0
EVENTS_READ_TIMEOUT = 60.0
"""Seconds of silence after which the event stream counts as lost: four of the API's 15 s pings."""
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
"""Waits before the 1st, 2nd, 3rd and later reconnections of a lost event stream (unless the server says)."""

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")


class ModelfleetClientError(Exception):
    """Root of everything the client raises: a message a person can act on, and a stable code."""

    code: str = "client_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ModelfleetAPIError(ModelfleetClientError):
    """The API answered with an error: its stable `code`, the HTTP `status`, its message and `details`."""

    def __init__(self, message: str, *, code: str, status: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.details = details or {}

    def is_a(self, kind: type[ModelfleetError]) -> bool:
        """Whether the code is `kind`'s or one of its subclasses' in the API's error tree (`broker.errors`)."""
        cls = ERRORS_BY_CODE.get(self.code)
        return cls is not None and issubclass(cls, kind)

    def __repr__(self) -> str:
        return f"ModelfleetAPIError(status={self.status}, code={self.code!r}, message={self.message!r})"


class ModelfleetConnectionError(ModelfleetClientError):
    """The API could not be reached: wrong URL, the head is down, or the network is."""

    code = "connection_error"


class ModelfleetTimeout(ModelfleetConnectionError):
    """The API did not answer within the client's timeout."""

    code = "client_timeout"


class UnexpectedResponse(ModelfleetClientError):
    """The API answered something this client cannot read (another version, or not the modelfleet API)."""

    code = "unexpected_response"


class NodeReferenceError(ModelfleetClientError):
    """A node reference (fingerprint, prefix or name) matches no registered node, or more than one."""

    code = "node_not_found"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to the API, free of any transport: what to send and how to read the answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    """Turns the decoded JSON body of a successful answer into the result."""
    json: dict[str, Any] | None = None
    timeout: float | None = None
    """None: the client's default."""
    ok: tuple[int, ...] = (200,)
    """Statuses whose body is an answer rather than an error."""


class endpoint(Generic[P, T]):
    """Turns a `Call` builder into a client method: plain on `Client`, awaitable on `AsyncClient`."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__
        signature = inspect.signature(build)
        self._signature = signature.replace(
            parameters=list(signature.parameters.values())[1:], return_annotation=inspect.Signature.empty
        )

    @overload
    def __get__(self, client: None, owner: type) -> "endpoint[P, T]": ...
    @overload
    def __get__(self, client: "Client", owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: "AsyncClient", owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        build = self._build

        def method(*args: Any, **kwargs: Any) -> Any:
            return client._execute(build(client, *args, **kwargs))

        functools.update_wrapper(method, build)
        method.__signature__ = self._signature  # type: ignore[attr-defined]  # help() shows no `self`
        return method


def _one(schema: type[M]) -> Callable[[Any], M]:
    """Reads an answer into the API's own model, ignoring fields a newer API added."""
    return lambda body: schema.model_validate(body, extra="ignore")


def _nodes(body: Any) -> list[NodeInfo]:
    return _one(NodeList)(body).data


def _node_path(fingerprint: str, rest: str = "") -> str:
    return f"/api/v1/nodes/{quote(fingerprint, safe='')}{rest}"


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def pick_node(nodes: list[NodeInfo], ref: str) -> NodeInfo:
    """The node `ref` names: an exact fingerprint, else an exact name, else a unique fingerprint prefix.

    A name shared by several nodes picks the one online node among them (a node restarted with a fresh state
    directory leaves an offline namesake behind); otherwise the reference is ambiguous.
    """
    ref = ref.strip()
    for node in nodes:
        if node.fingerprint == ref:
            return node
    named = [n for n in nodes if n.name == ref]
    if len(named) > 1:
        named = [n for n in named if n.online] or named
    if not named and ref:
        named = [n for n in nodes if n.fingerprint.startswith(ref.lower())]
    if len(named) == 1:
        return named[0]
    if not named:
        known = ", ".join(sorted({n.name for n in nodes})) or "none registered"
        raise NodeReferenceError(
            f"No node matches {ref!r} (by fingerprint, fingerprint prefix or name); nodes: {known}."
        )
    choices = ", ".join(f"{n.name} {n.fingerprint}" for n in named)
    raise NodeReferenceError(
        f"{ref!r} matches several nodes: {choices}; give more of the fingerprint.", code="ambiguous_node"
    )


class Endpoints:
    """Every endpoint of the API, written once; `Client` and `AsyncClient` run them."""

    job_timeout: float

    @endpoint
    def healthz(self) -> Call[Health]:
        """Whether the API reaches Redis (no key needed). A degraded API answers with `ok` False."""
        return Call("GET", "/healthz", _one(Health), ok=(200, 503))

    @endpoint
    def nodes(self) -> Call[list[NodeInfo]]:
        """Every registered node, online or not."""
        return Call("GET", "/api/v1/nodes", _nodes)

    @endpoint
    def node(self, fingerprint: str) -> Call[NodeInfo]:
        return Call("GET", _node_path(fingerprint), _one(NodeInfo))

    @endpoint
    def resolve_node(self, ref: str) -> Call[NodeInfo]:
        """The node a fingerprint, a unique fingerprint prefix or a node name refers to (see `pick_node`)."""
        return Call("GET", "/api/v1/nodes", lambda body: pick_node(_nodes(body), ref))

    @endpoint
    def node_models(self, fingerprint: str) -> Call[list[ModelInfo]]:
        """The models on one node, in every state."""
        return Call("GET", _node_path(fingerprint, "/models"), lambda body: _one(LIST.result)(body).data)

    @endpoint
    def node_catalog(self, fingerprint: str) -> Call[NodeCatalog]:
        """What one node can load (each file's size, memory estimate, and why it cannot be loaded, if it cannot),
        with its models and memory."""
        return Call("GET", _node_path(fingerprint, "/catalog"), _one(CATALOG.result))

    @endpoint
    def load(
        self,
        fingerprint: str,
        model_id: str,
        *,
        model_path: str | None = None,
        context_length: int | None = None,
        gpu_layers: int | None = None,
        backend: str | None = None,
    ) -> Call[LoadResult]:
        """Load a model on one node; returns once it is loaded (or already was). `backend`: "ctransformers" or
        "llama-cpp" instead of the node's choice for the file."""
        body = {"modelId": model_id, "modelPath": model_path, "contextLength": context_length, "gpuLayers": gpu_layers}
        body["backend"] = backend
        return Call(
            "POST", _node_path(fingerprint, "/models/load"), _one(LOAD.result), _drop_none(body), self.job_timeout
        )

    @endpoint
    def unload(self, fingerprint: str, model_id: str) -> Call[UnloadResult]:
        return Call(
            "POST",
            _node_path(fingerprint, "/models/unload"),
            _one(UNLOAD.result),
            {"modelId": model_id},
            self.job_timeout,
        )

    @endpoint
    def unload_all(self, fingerprint: str) -> Call[UnloadAllResult]:
        """Unload every model on one node; failures per model are in the result's `errors`."""
        return Call(
            "POST", _node_path(fingerprint, "/models/unload-all"), _one(UNLOAD_ALL.result), {}, self.job_timeout
        )

    @endpoint
    def pool_models(self) -> Call[PoolModelList]:
        """Every model file in the fleet, with where it is and where it is loaded."""
        return Call("GET", "/v1/models", _one(PoolModelList))

    @endpoint
    def pool_status(self) -> Call[PoolStatus]:
        return Call("GET", "/v1/models/status", _one(PoolStatus))

    @endpoint
    def pool_load(
        self,
        model: str,
        *,
        node: str | None = None,
        force_reload: bool = False,
        evict: bool = False,
        pin: bool = False,
        backend: str | None = None,
    ) -> Call[PoolLoadResult]:
        """Load a model wherever placement puts it (or on `node`, a fingerprint); `backend` as in `load`."""
        body = {"model_name": model, "node": node, "force_reload": force_reload, "evict": evict, "pin": pin}
        body["backend"] = backend
        return Call("POST", "/v1/models/load", _one(PoolLoadResult), _drop_none(body), self.job_timeout)

    @endpoint
    def pool_unload(self, model: str) -> Call[PoolUnloadResult]:
        """Unload a model from every node where it is loaded."""
        return Call("POST", "/v1/models/unload", _one(PoolUnloadResult), {"model_name": model}, self.job_timeout)

    @endpoint
    def pool_unload_all(self) -> Call[PoolUnloadAllResult]:
        return Call("POST", "/v1/models/unload-all", _one(PoolUnloadAllResult), {}, self.job_timeout)

    @endpoint
    def complete(self, model: str, prompt: str, **options: Any) -> Call[CompletionResponse]:
        """Continue `prompt` (`POST /v1/completions`); `options` are OpenAI's: max_tokens, temperature, top_p,
        seed, stop. Waits for the whole answer (and for a load on demand)."""
        body = prompt_body(model, prompt, None, options, stream=False)
        return Call("POST", "/v1/completions", _one(CompletionResponse), body, self.job_timeout)

    @endpoint
    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> Call[ChatCompletionResponse]:
        """Answer a conversation (`POST /v1/chat/completions`): `messages` as OpenAI's, `{"role", "content"}`."""
        body = prompt_body(model, None, messages, options, stream=False)
        return Call("POST", "/v1/chat/completions", _one(ChatCompletionResponse), body, self.job_timeout)


def prompt_body(
    model: str, prompt: str | None, messages: list[dict[str, Any]] | None, options: dict[str, Any], *, stream: bool
) -> dict[str, Any]:
    """An inference request's body: a prompt (completions) or messages (chat), and OpenAI's options."""
    body: dict[str, Any] = {"model": model, "stream": stream, **_drop_none(options)}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    return body


def _inference_path(messages: list[dict[str, Any]] | None) -> str:
    return "/v1/chat/completions" if messages is not None else "/v1/completions"


def _stream_request(
    model: str, prompt: str | None, messages: list[dict[str, Any]] | None, options: dict[str, Any]
) -> dict[str, Any]:
    """The arguments of a streamed inference request: path, body, and a read timeout that a load can take."""
    return {
        "method": "POST",
        "url": _inference_path(messages),
        "json": prompt_body(model, prompt, messages, options, stream=True),
        "timeout": httpx.Timeout(JOB_TIMEOUT, connect=CONNECT_TIMEOUT),
    }


def stream_text(event: StreamEvent) -> str | None:
    """The text a streamed chunk adds (a completion's `text` or a chat `delta.content`); None at `[DONE]`.
    An error event (a node failed mid-answer) is raised as ModelfleetAPIError."""
    raw = event.raw
    if raw == "[DONE]":
        return None
    if not isinstance(raw, dict):
        raise UnexpectedResponse(f"The answer stream held something this client cannot read: {str(raw)[:100]!r}.")
    if isinstance(raw.get("error"), dict):
        error = raw["error"]
        raise ModelfleetAPIError(str(error.get("message")), code=str(error.get("code") or "error"), status=200)
    pieces = []
    for choice in raw.get("choices") or ():
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            pieces.append(text)
    return "".join(pieces)


def _http_options(url: str | None, key: str | None, timeout: float, transport: object) -> tuple[str, dict[str, Any]]:
    """The API's URL and the httpx client options both clients share (base URL, key, timeouts, transport)."""
    url, headers = _settings(url, key)
    options = {
        "base_url": url,
        "headers": headers,
        "timeout": httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
        "transport": transport,
    }
    return url, options


def _settings(url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    url = (url or os.environ.get("MODELFLEET_URL") or DEFAULT_URL).rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ModelfleetClientError(f"Invalid API URL {url!r}: {exc}.", code="invalid_url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ModelfleetClientError(f"Invalid API URL {url!r}: expected http(s)://host[:port].", code="invalid_url")
    key = key if key is not None else os.environ.get("MODELFLEET_KEY")
    return url, {"Authorization": f"Bearer {key}"} if key else {}


def _request_args(call: Call[Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"json": call.json}
    if call.timeout is not None:
        args["timeout"] = httpx.Timeout(call.timeout, connect=CONNECT_TIMEOUT)
    return args


def _transport_error(url: str, exc: httpx.TransportError) -> ModelfleetConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return ModelfleetTimeout(f"The modelfleet API at {url} did not answer in time ({type(exc).__name__}).")
    reason = str(exc).rstrip(".") or type(exc).__name__
    return ModelfleetConnectionError(f"Cannot reach the modelfleet API at {url}: {reason}.")


def _read(call: Call[T], response: httpx.Response) -> T:
    """The call's result from a complete response, or the error it carries."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code not in call.ok:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's shape (inference routes)
            error = body["error"]
            raise ModelfleetAPIError(
                str(error.get("message") or response.reason_phrase),
                code=str(error.get("code") or error.get("type") or "http_error"),
                status=response.status_code,
            )
        if isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("error"), str):
            details = body.get("details")
            raise ModelfleetAPIError(
                body["error"],
                code=body["code"],
                status=response.status_code,
                details=details if isinstance(details, dict) else {},
            )
        raise ModelfleetAPIError(
            f"{call.method} {call.path} answered HTTP {response.status_code} {response.reason_phrase}.",
            code="http_error",
            status=response.status_code,
        )
    try:
        return call.parse(body)
    except (ValidationError, KeyError, TypeError) as exc:
        raise UnexpectedResponse(
            f"{call.method} {call.path} answered something this client cannot read (a different version?): "
            f"{type(exc).__name__}."
        ) from exc


EventRetry = Callable[[ModelfleetClientError, float], None]
"""Called with what ended the stream and the seconds until the next attempt, before each reconnection."""


def _events_request(node: str | None, last_event_id: str | None) -> dict[str, Any]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return {
        "params": {"node": node} if node else None,
        "headers": headers,
        "timeout": httpx.Timeout(CONNECT_TIMEOUT, read=EVENTS_READ_TIMEOUT),
    }


RETRY_STATUSES = (429, 502, 503, 504)
"""Answers to a reconnection that mean "not now" (a proxy while the head restarts, a head shutting down or
without Redis for a moment): retried like a lost connection once the stream has opened, never before."""


class _Follower:
    """What both clients' `events` share: the decoder, the request to (re)open the stream, and when to retry."""

    def __init__(
        self, url: str, node: str | None, last_event_id: str | None, reconnect: bool, on_retry: EventRetry | None
    ) -> None:
        self.decoder = SseDecoder(last_event_id)
        self._url, self._node, self._reconnect, self._on_retry = url, node, reconnect, on_retry
        self._opened, self._failures = False, 0

    def request(self) -> dict[str, Any]:
        self.decoder.reset()
        return _events_request(self._node, self.decoder.last_event_id)

    def refusal(self, response: httpx.Response) -> ModelfleetClientError | None:
        """None if the stream opened. A passing refusal of a reconnection is returned, to retry after; any other
        refusal (bad key, unknown node) is raised as for any other call. The caller has read a refusal's body."""
        if response.status_code == 200:
            self._opened, self._failures = True, 0
            return None
        try:
            _read(Call("GET", "/api/v1/events", lambda body: None), response)
        except ModelfleetAPIError as exc:
            if self._reconnect and self._opened and exc.status in RETRY_STATUSES:
                return exc
            raise
        raise UnexpectedResponse(f"GET /api/v1/events answered HTTP {response.status_code} without an error.")

    def retry_after(
        self, error: ModelfleetClientError | None, lost: httpx.TransportError | None = None
    ) -> float | None:
        """Seconds to wait before reopening a stream that ended (`error` None), broke (`lost`) or was refused for
        now; None to stop there. Raises what ends the stream for good: a broken one without `reconnect`, or one
        that never opened."""
        if lost is not None:
            error = _transport_error(self._url, lost)
            if not (self._reconnect and self._opened):
                raise error from lost
        if not self._reconnect:
            return None
        retry = self.decoder.retry
        delay = retry if retry is not None else RECONNECT_DELAYS[min(self._failures, len(RECONNECT_DELAYS) - 1)]
        self._failures += 1
        if self._on_retry is not None:
            self._on_retry(error or ModelfleetConnectionError(STREAM_ENDED), delay)
        return delay


STREAM_ENDED = "The API ended the event stream (it may be restarting)."


class Client(Endpoints):
    """The modelfleet API, synchronously. URL and key default to MODELFLEET_URL and MODELFLEET_KEY."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = TIMEOUT,
        job_timeout: float = JOB_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, options = _http_options(url, key, timeout, transport)
        self.job_timeout = job_timeout
        self._http = httpx.Client(**options)

    def _execute(self, call: Call[T]) -> T:
        try:
            response = self._http.request(call.method, call.path, **_request_args(call))
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        return _read(call, response)

    def events(
        self,
        node: str | None = None,
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        on_retry: EventRetry | None = None,
    ) -> Iterator[StreamEvent]:
        """Follow the pool's changes (`GET /api/v1/events`, one node's with `node`, a fingerprint): a snapshot
        first, then every event, and each node's usage as `UsageEvent`s (gauges: they do not move the id a
        reconnection resumes after). With `reconnect`, a stream that is lost after it opened is resumed after the last
        event received (or starts over from a new snapshot if the API no longer holds that far back)."""
        follower = _Follower(self.url, node, last_event_id, reconnect, on_retry)
        while True:
            try:
                with self._http.stream("GET", "/api/v1/events", **follower.request()) as response:
                    if response.status_code != 200:
                        response.read()
                    refused = follower.refusal(response)
                    if refused is None:
                        for text in response.iter_text():
                            yield from follower.decoder.feed_text(text)
                delay = follower.retry_after(refused)
            except httpx.TransportError as exc:
                delay = follower.retry_after(None, exc)
            if delay is None:
                return
            time.sleep(delay)

    def stream(
        self, model: str, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None, **options: Any
    ) -> Iterator[str]:
        """The answer's text as it is generated: to `prompt` (completions) or to `messages` (chat)."""
        decoder = SseDecoder()
        try:
            with self._http.stream(**_stream_request(model, prompt, messages, options)) as response:
                if response.status_code != 200:
                    response.read()
                    _read(Call("POST", response.request.url.path, lambda body: None), response)
                for chunk in response.iter_text():
                    texts, ended = _stream_texts(decoder, chunk)
                    yield from texts
                    if ended:
                        return
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(Endpoints):
    """The modelfleet API for asyncio: the same methods as `Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = TIMEOUT,
        job_timeout: float = JOB_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, options = _http_options(url, key, timeout, transport)
        self.job_timeout = job_timeout
        self._http = httpx.AsyncClient(**options)

    async def _execute(self, call: Call[T]) -> T:
        try:
            response = await self._http.request(call.method, call.path, **_request_args(call))
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        return _read(call, response)

    async def events(
        self,
        node: str | None = None,
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        on_retry: EventRetry | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """As `Client.events`, for `async for`."""
        follower = _Follower(self.url, node, last_event_id, reconnect, on_retry)
        while True:
            try:
                async with self._http.stream("GET", "/api/v1/events", **follower.request()) as response:
                    if response.status_code != 200:
                        await response.aread()
                    refused = follower.refusal(response)
                    if refused is None:
                        async for text in response.aiter_text():
                            for event in follower.decoder.feed_text(text):
                                yield event
                delay = follower.retry_after(refused)
            except httpx.TransportError as exc:
                delay = follower.retry_after(None, exc)
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def stream(
        self, model: str, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None, **options: Any
    ) -> AsyncIterator[str]:
        """As `Client.stream`, for `async for`."""
        decoder = SseDecoder()
        try:
            async with self._http.stream(**_stream_request(model, prompt, messages, options)) as response:
                if response.status_code != 200:
                    await response.aread()
                    _read(Call("POST", response.request.url.path, lambda body: None), response)
                async for chunk in response.aiter_text():
                    texts, ended = _stream_texts(decoder, chunk)
                    for text in texts:
                        yield text
                    if ended:
                        return
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _stream_texts(decoder: SseDecoder, chunk: str) -> tuple[list[str], bool]:
    """The answer texts in one received chunk of an inference stream, and whether the stream ended in it."""
    texts: list[str] = []
    for event in decoder.feed_text(chunk):
        text = stream_text(event)
        if text is None:
            return texts, True
        if text:
            texts.append(text)
    return texts, False
