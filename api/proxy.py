"""Proxying one inference request to a node's endpoint, as a stream, with one retry before the first byte.

`ProxyResponse` is an ASGI response that does the whole exchange itself, so that a client going away is seen
at every stage (waiting for a load, for a node's queue, or mid-stream): a task watches for `http.disconnect`
and cancels the exchange, which closes the upstream response, which closes the connection to the node, which
stops its generation.

The exchange: take an in-flight lease on the least loaded replica (`api.inflight`), send the request there
with httpx and read the first chunk of the answer. A node that cannot be reached, answers 5xx or 429, or
breaks before its first byte, is left and the request is sent once more to another replica. Only then does the
client get the status line and headers: the node's own, with its first chunk right behind, then every chunk as
it arrives (`aiter_raw`: nothing re-encoded, nothing buffered). A node that fails after the first byte cannot
be retried (the client has part of an answer): an event stream gets an OpenAI error event in place of the rest.

A replica that could not be reached, broke or went away (before its first byte, or mid-stream) is left out of
this process's picks for a while (`Cooldown`), so that the requests after it do not each pay the same failure
(a connect timeout, say) before their retry: outlier ejection, as load balancers do it. Then one request tries
it while the others keep away. An answer, even 429 or a 5xx, is no such failure: the node is up, and the
health checks of its models speak for them. When every replica is left out, they are tried anyway: a refusal
without a try helps nobody.

A node process that dies or is replaced does not always break the connection at once (a frozen machine, a
network partition: no FIN, no RST). With `liveness` (the API's `ReplyWaiter`), each exchange also watches the
node's boot id: a replica whose process is gone before the first byte counts as failed (the request goes to
another replica); one gone mid-stream ends the stream with an OpenAI error event within a liveness tick.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from api.inflight import InFlight, Lease
from api.metrics import InferenceMetrics
from api.replies import ReplyWaiter
from api.routing import Replica, Router
from api.settings import ApiSettings
from broker.errors import ModelfleetError, NodeUnavailable
from broker.openai import SSE_DONE, error_body, sse_data

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""A node's answers that another replica may not give: busy, or broken."""
PASSED_HEADERS = ("content-type", "retry-after", "x-request-id")
SSE = "text/event-stream"

NodeHeaders = Callable[[Replica, str | None], dict[str, str]]
"""The headers that authenticate the head to a replica's node, given the caller's Authorization header."""


@dataclass(frozen=True)
class Failure:
    """Why a replica gave nothing worth passing on before its first byte."""

    replica: Replica
    what: str
    """What happened, without the node's name (`reason` has it)."""
    broken: bool = True
    """It could not be reached, broke, went away or refused the head: left out of routing for a while
    (`Cooldown`). An answer (429 busy, a 5xx) is not: the node is up, and its own health checks speak for its
    models."""

    @property
    def reason(self) -> str:
        return f"{_named(self.replica)} {self.what}"


def _named(replica: Replica) -> str:
    return f"node {replica.node.name} ({replica.node.fingerprint})"


@dataclass
class _Ejection:
    until: float
    failures: int
    """Failures in a row, trials after a cooldown included."""
    trial: bool = False
    """A request is on its way to it after its cooldown: the others keep away until it is answered."""


class Cooldown:
    """Replicas that could not be reached, broke or went away lately, left out of this API process's picks:
    `base` seconds after a failure, doubling with each failure in a row up to `cap`. Once that time is over, one
    request goes to it as a trial while the others still keep away; its answer ends the ejection, its failure
    starts a longer one. Failures of requests that were under way when it was left out count once. `base` 0
    turns it off."""

    def __init__(self, base: float, *, cap: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.cap = cap
        self._clock = clock
        self._out: dict[str, _Ejection] = {}  # node fingerprint -> its ejection

    def failed(self, fingerprint: str) -> float:
        """Count a failure of the replica on this node; the seconds it is left out for from now (0: it already
        was, or this is off)."""
        if self.base <= 0:
            return 0.0
        now = self._clock()
        out = self._out.get(fingerprint)
        if out is not None and out.until > now:
            return 0.0  # a request sent before it was left out: the same failure, told again
        failures = out.failures if out is not None else 0
        seconds = min(self.cap, self.base * 2 ** min(failures, 16))
        self._out[fingerprint] = _Ejection(now + seconds, failures + 1)
        return seconds

    def answered(self, fingerprint: str) -> None:
        self._out.pop(fingerprint, None)

    def cooling(self, fingerprint: str) -> bool:
        """Whether the replica on this node is left out now (its cooldown, or another request's trial)."""
        out = self._out.get(fingerprint)
        return out is not None and (out.trial or out.until > self._clock())

    def usable(self, fingerprints: list[str]) -> tuple[list[str], list[str]]:
        """The nodes among `fingerprints` a request may go to (all of them if every one is left out), and those
        among them whose cooldown is over: the request is their trial, and the others keep away until `tried`."""
        if not self._out:
            return fingerprints, []
        now = self._clock()
        ready: list[str] = []
        trials: list[str] = []
        for fp in fingerprints:
            out = self._out.get(fp)
            if out is None:
                ready.append(fp)
            elif out.until <= now and not out.trial:
                out.trial = True
                ready.append(fp)
                trials.append(fp)
        return (ready, trials) if ready else (fingerprints, [])

    def tried(self, *fingerprints: str) -> None:
        """The trial of these nodes ended, however (one whose caller left leaves the next request to try)."""
        for fp in fingerprints:
            out = self._out.get(fp)
            if out is not None:
                out.trial = False


@dataclass
class Opened:
    """An upstream answer whose first chunk has arrived."""

    replica: Replica
    lease: Lease
    response: httpx.Response
    chunks: AsyncIterator[bytes]
    """The rest of the body, after `first`."""
    first: bytes


def node_timeout(settings: ApiSettings) -> httpx.Timeout:
    """How long the head waits to reach a node and for each read of its answer."""
    return httpx.Timeout(
        settings.inference_read_timeout, connect=settings.inference_connect_timeout, pool=settings.load_timeout
    )


def node_auth(settings: ApiSettings) -> NodeHeaders:
    """How the head authenticates to nodes: with the fleet's node token (`MODELFLEET_NODE_TOKEN`), never with the
    caller's own key. A caller's key could be an operator key, and a node's endpoint is whatever URL the node
    wrote into Redis: forwarding it would hand keys to anything that can write there. Without a token the head
    sends no credential, and a node's refusal is reported as the configuration error it is (see `_first`)."""
    token = settings.node_token.get_secret_value() if settings.node_token is not None else None

    def headers(replica: Replica, authorization: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"} if token else {}

    return headers


class NodeProxy:
    """Sends inference requests to replicas: picks, retries before the first byte, and releases leases."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        timeout: httpx.Timeout,
        inflight: InFlight,
        router: Router,
        metrics: InferenceMetrics,
        auth: NodeHeaders,
        *,
        liveness: ReplyWaiter | None = None,
        cooldown: float = 5.0,
    ) -> None:
        self.transport = transport
        self.cooldown = Cooldown(cooldown)
        self._timeout = {"timeout": timeout.as_dict()}
        self.inflight = inflight
        self.router = router
        self.metrics = metrics
        self._auth = auth
        self.liveness = liveness

    def watch(self, replica: Replica) -> "asyncio.Future[Any] | None":
        """A future that fails once the replica's node process is gone (None without `liveness`)."""
        if self.liveness is None:
            return None
        node = replica.node
        return self.liveness.watch(node.fingerprint, node.name, node.boot_id)

    def unwatch(self, watch: "asyncio.Future[Any] | None") -> None:
        if watch is not None and self.liveness is not None:
            self.liveness.unwatch(watch)

    async def open(self, model_id: str, path: str, body: bytes, authorization: str | None = None) -> Opened:
        """The first replica's answer that is worth passing on, or raise NodeUnavailable if none gave one."""
        replicas = await self.router.route(model_id)
        remaining = {r.node.fingerprint: r for r in replicas}
        failures: list[str] = []
        for attempt in range(2):
            candidates, trials = self.cooldown.usable(list(remaining))
            random.shuffle(candidates)  # ties between equally loaded nodes spread
            try:
                lease, _ = await self.inflight.acquire(candidates)
            except BaseException:
                self.cooldown.tried(*trials)
                raise
            self.cooldown.tried(*(fp for fp in trials if fp != lease.node))  # not this request's to try
            replica = remaining.pop(lease.node)
            # The last try passes on what the node answers; so is one whose alternatives are all left out.
            last = attempt == 1 or not remaining or all(self.cooldown.cooling(fp) for fp in remaining)
            try:
                opened = await self._try(replica, lease, path, body, authorization, last=last)
            except BaseException:
                await _shielded(self.inflight.release(lease))
                raise
            finally:
                if lease.node in trials:
                    self.cooldown.tried(lease.node)
            if isinstance(opened, Opened):
                if opened.response.status_code < 500:
                    self.cooldown.answered(lease.node)
                return opened
            failures.append(opened.reason)
            await self.inflight.release(lease)
            if opened.broken:
                self.failed(replica, opened.what)
            if last:
                break
            log.warning("retrying %s on another replica: %s", model_id, opened.reason)
        raise NodeUnavailable(
            f"No replica of model {model_id} could answer: {'; '.join(failures)}.", model=model_id, attempts=failures
        )

    def failed(self, replica: Replica, what: str) -> None:
        """Leave a replica that `what` happened to out of the next picks for a while (`Cooldown`)."""
        seconds = self.cooldown.failed(replica.node.fingerprint)
        if seconds:
            self.metrics.ejections.labels(replica.node.fingerprint).inc()
            log.warning("%s %s: left out of routing for %g s", _named(replica), what, seconds)

    async def _try(
        self, replica: Replica, lease: Lease, path: str, body: bytes, authorization: str | None, *, last: bool
    ) -> Opened | Failure:
        """An Opened, or why this replica failed before its first byte (its process gone included)."""
        watch = self.watch(replica)
        if watch is None:
            return await self._first(replica, lease, path, body, authorization, last=last)
        # The node's process going away cancels the wait for its answer (run here, not in a task of its own: a
        # task and asyncio.wait per request cost the head about 40 us before its first byte).
        lost = _OnLoss(watch)
        try:
            return await self._first(replica, lease, path, body, authorization, last=last)
        except asyncio.CancelledError:
            if not lost.took_effect():
                raise
            return Failure(replica, f"went away before answering: {lost}")
        finally:
            lost.stop()
            self.unwatch(watch)

    async def _first(
        self, replica: Replica, lease: Lease, path: str, body: bytes, authorization: str | None, *, last: bool
    ) -> Opened | Failure:
        headers = {"content-type": "application/json", **self._auth(replica, authorization)}
        # Straight to the transport: an httpx client's layers (auth flow, redirects, cookies, event hooks) have
        # nothing to do for a node, and cost the head about 0.1 ms of CPU a request.
        url = replica.endpoint + path
        request = httpx.Request("POST", url, content=body, headers=headers, extensions=dict(self._timeout))
        response: httpx.Response | None = None
        try:
            response = await self.transport.handle_async_request(request)
            if response.status_code in (401, 403):
                # The node refused the head itself, not the caller: passing its 401 on would tell a signed-in
                # caller to send a key. Another replica may hold the right token; the operator must be told.
                await response.aread()
                await response.aclose()
                log.warning(
                    "%s refused the head's credentials (HTTP %d): give the head and every node the same "
                    "MODELFLEET_NODE_TOKEN",
                    _named(replica),
                    response.status_code,
                )
                return Failure(replica, f"refused the head's node token (HTTP {response.status_code})")
            if response.status_code == 429:
                # Busy (its queue is full) or, said in the body, refusing keys new to the head's address because
                # too many wrong ones came from there (`broker.wrong_keys`): the head's token, not the caller's.
                answer = await response.aread()
                if b'"too_many_wrong_keys"' in answer:
                    await response.aclose()
                    log.warning(
                        "%s refuses the head's node token for now: too many wrong keys came from the head's "
                        "address (HTTP 429): the head's own, if its MODELFLEET_NODE_TOKEN differs from the node's, "
                        "or something else there guessing keys at that node",
                        _named(replica),
                    )
                    why = "too many wrong keys came from the head's address"
                    return Failure(replica, f"refused the head's node token for now ({why})")
                if not last:
                    await response.aclose()
                    return Failure(replica, "answered HTTP 429", broken=False)
                return Opened(replica, lease, response, _nothing(), answer)
            if response.status_code in RETRY_STATUSES and not last:
                await response.aread()
                await response.aclose()
                return Failure(replica, f"answered HTTP {response.status_code}", broken=False)
            chunks = response.aiter_raw()
            first = b""
            async for chunk in chunks:
                if chunk:
                    first = chunk
                    break
            return Opened(replica, lease, response, chunks, first)
        except httpx.TransportError as exc:
            if response is not None:
                await _shielded(response.aclose())
            return Failure(replica, f"failed before answering ({type(exc).__name__})")
        except BaseException:
            if response is not None:
                await _shielded(response.aclose())
            raise


async def _nothing() -> AsyncIterator[bytes]:
    """The rest of an answer read whole."""
    return
    yield


class _OnLoss:
    """Cancels the current task once `watch` (`NodeProxy.watch`) fails: its node's process is gone."""

    def __init__(self, watch: "asyncio.Future[Any]") -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watch = watch
        self._active = True
        self._settled = False
        self.error: BaseException | None = None
        watch.add_done_callback(self._fire)

    def _fire(self, watch: "asyncio.Future[Any]") -> None:
        # A callback already scheduled when `stop` ran still comes: the flag keeps it from cancelling later work.
        if self._active and not watch.cancelled() and (exc := watch.exception()) is not None:
            self.error = exc
            self._task.cancel()

    def took_effect(self) -> bool:
        """Whether the CancelledError being handled is this loss's (then it is taken back); another cancellation
        pending besides (the caller left as well) makes it False, and that one goes on."""
        if self.error is None:
            return False
        self._settled = True
        return self._task.uncancel() == 0

    def stop(self) -> None:
        self._active = False
        self._watch.remove_done_callback(self._fire)
        if self.error is not None and not self._settled:
            # The cancellation was delivered and swallowed on the way (a cleanup under `_shielded`): take its
            # count back, or the task's next loss would be taken for its caller's own cancellation.
            self._settled = True
            self._task.uncancel()

    def __str__(self) -> str:
        return str(self.error)


async def _shielded(awaitable: Awaitable[object]) -> None:
    """Run a cleanup step to its end even while the task is being cancelled."""
    task = asyncio.ensure_future(awaitable)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.shield(task)
    if not task.done():
        with contextlib.suppress(Exception):
            await task


async def coalesced(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The node's chunks as they come, but those that arrived while the last one was being written go out
    together: one write to the client instead of one per token (a write is the largest share of the head's CPU
    per token). A reader task fills the backlog; nothing waits for a batch to fill, so an idle stream's latency
    is unchanged. The reader's failure (the node's connection breaking) is raised here, after what it read."""
    backlog: list[bytes] = []
    arrived = asyncio.Event()
    ended: list[BaseException | None] = []

    async def read() -> None:
        try:
            async for chunk in chunks:
                backlog.append(chunk)
                arrived.set()
        except Exception as exc:
            ended.append(exc)
        else:
            ended.append(None)
        arrived.set()

    reader = asyncio.create_task(read(), name="modelfleet-proxy-read")
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            if backlog:
                batch = backlog[0] if len(backlog) == 1 else b"".join(backlog)
                backlog.clear()
                yield batch
            if ended and not backlog:
                if ended[0] is not None:
                    raise ended[0]
                return
    finally:
        reader.cancel()
        await _shielded(reader)


def error_event(message: str, code: str, status: int = 502) -> bytes:
    """An OpenAI error as one SSE event, then the end of the stream, as the node itself ends a failed stream:
    openai-python raises APIError on the event; other clients see `[DONE]` and stop reading."""
    return sse_data(error_body(status, code, message)) + SSE_DONE


class ProxyResponse(Response):
    """The ASGI response of one proxied inference request (see the module docstring). A Response subclass only
    so that FastAPI passes it through; status and headers are the node's, decided once its first chunk is in."""

    def __init__(
        self, proxy: NodeProxy, model_id: str, path: str, body: bytes, *, stream: bool, authorization: str | None
    ) -> None:
        super().__init__()
        self._authorization = authorization
        self._proxy = proxy
        self._model = model_id
        self._path = path
        self._body = body
        self._stream = stream
        self.started = time.perf_counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False, "gone": False}

        async def watch() -> None:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["done"]:
                        state["gone"] = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch(), name="modelfleet-proxy-disconnect")
        try:
            await self._exchange(send)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()  # the client left: nothing to answer, nobody to tell
        finally:
            state["done"] = True
            watcher.cancel()

    async def _exchange(self, send: Send) -> None:
        metrics = self._proxy.metrics
        outcome = "cancelled"
        try:
            opened = await self._proxy.open(self._model, self._path, self._body, self._authorization)
        except ModelfleetError as exc:
            metrics.refused(exc.code)
            raise
        except BaseException:
            metrics.refused(outcome)
            raise
        metrics.in_flight.labels(self._model).inc()
        response = opened.response
        tally = metrics.tally(
            self._model, self.started, stream=self._stream, chat=self._path.endswith("chat/completions")
        )
        try:
            tally.first(opened.first)
            headers = [(k.encode(), v.encode()) for k in PASSED_HEADERS if (v := response.headers.get(k)) is not None]
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            headers.append((b"x-modelfleet-node", opened.replica.node.fingerprint.encode()))
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            if opened.first:
                await send({"type": "http.response.body", "body": opened.first, "more_body": True})
            outcome = "ok" if response.status_code < 400 else f"http_{response.status_code}"
            watch = self._proxy.watch(opened.replica)
            # The read may never end by itself (no FIN comes from a frozen machine): the node's loss cancels it.
            lost = _OnLoss(watch) if watch is not None else None
            try:
                async for chunk in coalesced(opened.chunks):
                    tally.chunk(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except asyncio.CancelledError:
                if lost is None or not lost.took_effect():
                    raise
                outcome = "node_lost_mid_stream"
                self._proxy.failed(opened.replica, "went away mid-stream")
                node = opened.replica.node
                log.warning("node %s went away mid-stream for %s: %s", node.name, self._model, lost)
                if response.headers.get("content-type", "").startswith(SSE):
                    message = f"{lost} The answer is cut short."
                    event = error_event(message, getattr(lost.error, "code", "node_error"))
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            except httpx.TransportError as exc:
                outcome = "node_failed_mid_stream"
                self._proxy.failed(opened.replica, f"failed mid-stream ({type(exc).__name__})")
                node = opened.replica.node
                log.warning("node %s failed mid-stream for %s: %s", node.name, self._model, type(exc).__name__)
                if response.headers.get("content-type", "").startswith(SSE):
                    message = (
                        f"Node {node.name} ({node.fingerprint})'s connection broke while it answered (its process "
                        "stopped or restarted?); the answer is cut short."
                    )
                    event = error_event(message, NodeUnavailable.code)
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            finally:
                if lost is not None:
                    lost.stop()
                self._proxy.unwatch(watch)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await _shielded(response.aclose())
            await _shielded(self._proxy.inflight.release(opened.lease))
            metrics.in_flight.labels(self._model).dec()
            tally.done(outcome)
