"""The streaming proxy over real HTTP: real uvicorn servers stand in for the nodes' endpoints (the real node
endpoint is exercised end to end in tests/e2e/test_inference.py), the head side is `ProxyResponse` served by
uvicorn, the in-flight leases and node hashes live in a real redis-server."""

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from redis import Redis as SyncRedis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.errors import install_error_handlers
from api.inflight import InFlight
from api.metrics import Metrics
from api.node_transport import NodeTransport
from api.proxy import Cooldown, NodeProxy, ProxyResponse
from api.replies import ReplyWaiter
from api.routing import NodeView, Router
from broker import keys
from broker.registry import NodeDirectory
from tests.api.test_routing import A, B, model, register
from tests.conftest import free_port, wait_for


@dataclass
class Upstream:
    """A node's endpoint: answers a few SSE tokens, or fails the way it is told to."""

    mode: str = "ok"
    tokens: int = 5
    gap: float = 0.0
    requests: int = 0
    open_streams: int = 0
    closed: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        async def complete(request: Request) -> Response:
            self.requests += 1
            body = await request.json()
            if self.mode == "500":
                return JSONResponse({"error": {"message": "boom", "type": "server_error", "code": "x"}}, 500)
            if self.mode == "429":
                error = {"error": {"message": "busy", "type": "rate_limit_error", "code": "model_busy"}}
                return JSONResponse(error, 429, headers={"retry-after": "1"})
            if self.mode == "locked":  # refusing keys new to the head's address (`broker.wrong_keys`)
                error = {"error": {"message": "Too many wrong keys", "type": "rate_limit_error"}}
                error["error"]["code"] = "too_many_wrong_keys"
                return JSONResponse(error, 429, headers={"retry-after": "3"})
            if self.mode == "404":
                return JSONResponse({"error": {"message": "no", "type": "not_found_error", "code": "y"}}, 404)
            if not body.get("stream"):
                return JSONResponse({"choices": [{"text": "hi"}], "usage": {"completion_tokens": 1}})

            async def events() -> AsyncIterator[bytes]:
                self.open_streams += 1
                try:
                    for i in range(self.tokens):
                        if self.mode == "cut" and i == 2:
                            raise RuntimeError("node died mid-stream")
                        yield f'data: {{"choices":[{{"text":"t{i}","finish_reason":null}}]}}\n\n'.encode()
                        await asyncio.sleep(self.gap)
                    yield b"data: [DONE]\n\n"
                finally:
                    self.open_streams -= 1
                    self.closed.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])])


@contextlib.contextmanager
def serve(app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "a test server")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def head(
    redis: str,
    upstreams: dict[str, str],
    *,
    liveness_tick: float | None = None,
    busy: tuple[str, ...] = (),
    cooldown: float = 5.0,
) -> tuple[Starlette, dict[str, object]]:
    """The head's proxy route, its nodes registered in Redis (at the URL `redis`) with `upstreams` as their
    endpoints; with `liveness_tick`, watching node processes as the API does; `busy` nodes hold a lease already
    (picked last)."""
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(redis)
        for fp, url in upstreams.items():
            await register(client, fp, [model("m").model_copy(update={"endpoint": url})])

        async def no_load(model_id: str) -> None:
            raise AssertionError("no load on demand here")

        directory = NodeDirectory(client)
        router = Router(client, directory, NodeView(directory), no_load, on_demand=False, load_timeout=5)
        inflight = InFlight(client)
        for fp in busy:
            await inflight.acquire([fp])
        metrics = Metrics()
        waiter = ReplyWaiter(client, tick=liveness_tick, registry_grace=1.0) if liveness_tick else None
        if waiter is not None:
            await waiter.start()
        transport = NodeTransport()
        try:
            auth = lambda replica, authorization: {}  # noqa: E731
            timeout = httpx.Timeout(30)
            state["proxy"] = NodeProxy(
                transport, timeout, inflight, router, metrics.inference, auth, liveness=waiter, cooldown=cooldown
            )
            state["metrics"] = metrics
            yield
        finally:
            await transport.aclose()
            await inflight.stop()
        if waiter is not None:
            await waiter.stop()

    async def complete(request: Request) -> Response:
        body = await request.body()
        stream = bool(json.loads(body).get("stream"))
        return ProxyResponse(state["proxy"], "m", "/v1/completions", body, stream=stream, authorization=None)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])], lifespan=lifespan)
    install_error_handlers(app)
    return app, state


def inflight_total(redis: str) -> int:
    client = SyncRedis.from_url(redis)
    return sum(int(client.zcard(keys.inflight(fp))) for fp in (A, B))


def test_streams_each_chunk_as_the_node_sends_it(redis: str) -> None:
    node = Upstream(tokens=3, gap=0.3)
    with serve(node.app()) as node_url:
        app, _ = head(redis, {A: node_url})
        with serve(app) as url, httpx.stream("POST", url + "/v1/completions", json={"stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-modelfleet-node"] == A
            lines = response.iter_lines()
            first = next(lines)
            # The first token is here while the node still holds the others back: nothing was buffered.
            assert first.startswith("data: ") and '"t0"' in first
            assert node.open_streams == 1
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and len(rest) == 3
    assert inflight_total(redis) == 0


def test_plain_answers_pass_through(redis: str) -> None:
    with serve(Upstream().app()) as node_url:
        app, _ = head(redis, {A: node_url})
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"stream": False})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "hi"


def test_a_client_that_disconnects_closes_the_node_stream_at_once(redis: str) -> None:
    node = Upstream(tokens=10_000, gap=0.02)
    with serve(node.app()) as node_url:
        app, _ = head(redis, {A: node_url})
        with serve(app) as url:
            with httpx.stream("POST", url + "/v1/completions", json={"stream": True}) as response:
                lines = response.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
                next(lines)
                assert inflight_total(redis) == 1
            # The client closed its connection: the head closes the node's, the node's stream ends.
            wait_for(node.closed.is_set, 5, "the node's stream to be closed")
            wait_for(lambda: inflight_total(redis) == 0, 5, "the lease to be released")
            assert node.open_streams == 0


def other_api_on(redis: str, *fingerprints: str) -> None:
    """A request of another API process in flight on each node: the others, less loaded, are picked first."""
    client = SyncRedis.from_url(redis)
    for fp in fingerprints:
        client.zadd(keys.inflight(fp), {"other-api:1": int(time.time() * 1000) + 600_000})


def three_answered_by_b(redis: str, first: Upstream) -> tuple[list[httpx.Response], Upstream]:
    """Three streamed requests, `first` serving node A (picked first: B is busier) and a good node B; each one's
    answer, all of them B's, and B's upstream."""
    good = Upstream()
    other_api_on(redis, B)
    with serve(first.app()) as first_url, serve(good.app()) as good_url:
        app, _ = head(redis, {A: first_url, B: good_url})
        with serve(app) as url:
            responses = [httpx.post(url + "/v1/completions", json={"stream": True}) for _ in range(3)]
    for response in responses:
        assert response.status_code == 200 and response.headers["x-modelfleet-node"] == B
    return responses, good


def test_a_node_failing_before_its_first_byte_is_retried_on_the_other(redis: str) -> None:
    broken = Upstream(mode="500")
    responses, good = three_answered_by_b(redis, broken)
    assert all(response.text.endswith("data: [DONE]\n\n") for response in responses)
    # A 500 is an answer: the node is up (its models' checks speak for them), so it is not left out.
    assert broken.requests == 3 and good.requests == 3
    assert inflight_total(redis) == 1  # only the other process's


@dataclass
class Slammer:
    """A node's endpoint that accepts connections and closes them at once, counting them: broken under HTTP."""

    accepted: int = 0

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        running = True

        def run() -> None:
            while running:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                self.accepted += 1
                connection.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            running = False
            thread.join(5)
            listener.close()


def burst(url: str, n: int) -> list[str]:
    """`n` streamed requests at once: the node each was answered by."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one() -> str:
                response = await client.post("/v1/completions", json={"stream": True})
                assert response.status_code == 200
                return response.headers["x-modelfleet-node"]

            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(run())


def test_a_broken_node_is_left_out_then_tried_by_one_request(redis: str) -> None:
    broken, good = Slammer(), Upstream()
    other_api_on(redis, B)
    with broken.serve() as broken_url, serve(good.app()) as good_url:
        app, state = head(redis, {A: broken_url, B: good_url}, cooldown=2.0)
        with serve(app) as url:
            cooldown = state["proxy"].cooldown  # type: ignore[attr-defined]
            assert burst(url, 1) == [B] and broken.accepted == 1 and cooldown.cooling(A)
            # Left out: the requests after it go straight to the good one.
            assert burst(url, 3) == [B] * 3 and broken.accepted == 1
            wait_for(lambda: not cooldown.cooling(A), 5, "the cooldown to end")
            # Its time over, one request of a burst tries it (and fails over); the others keep away meanwhile.
            assert burst(url, 4) == [B] * 4 and broken.accepted == 2
            assert cooldown.cooling(A)  # and it is out again
    assert inflight_total(redis) == 1  # only the other process's


def test_a_busy_node_is_not_left_out(redis: str) -> None:
    busy = Upstream(mode="429")
    three_answered_by_b(redis, busy)
    assert busy.requests == 3  # a full queue is no fault: each request asks it first again


def test_a_node_that_refuses_the_heads_token_for_wrong_keys_is_left_out_and_never_blamed_on_the_caller(
    redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node answering 429 `too_many_wrong_keys` refuses the head's own token (something at the head's address
    guessed keys there): like a 401, the operator is told, the node is left out, and the caller's request goes
    elsewhere, or is answered 503, never the node's 429 about a key the caller did not send."""
    locked = Upstream(mode="locked")
    with caplog.at_level(logging.WARNING, logger="api.proxy"):
        three_answered_by_b(redis, locked)
    assert locked.requests == 1  # left out after the first
    assert any("refuses the head's node token for now" in r.getMessage() for r in caplog.records)
    alone = Upstream(mode="locked")
    with serve(alone.app()) as alone_url:
        app, _ = head(redis, {A: alone_url})
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"stream": True})
    assert response.status_code == 503 and response.json()["error"]["code"] == "node_unavailable"
    assert "refused the head's node token for now" in response.json()["error"]["message"]


def test_a_busy_node_alone_passes_its_429_on(redis: str) -> None:
    busy = Upstream(mode="429")
    with serve(busy.app()) as busy_url:
        app, _ = head(redis, {A: busy_url})
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"stream": True})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "model_busy"
    assert inflight_total(redis) == 0


def test_replicas_all_left_out_are_still_tried(redis: str) -> None:
    one, two = Slammer(), Slammer()
    with one.serve() as one_url, two.serve() as two_url:
        app, _ = head(redis, {A: one_url, B: two_url})
        with serve(app) as url:
            first = httpx.post(url + "/v1/completions", json={"stream": False})
            assert first.status_code == 503 and one.accepted + two.accepted == 2
            # Both left out: the next request still tries one (rather than refusing unasked), and only one.
            second = httpx.post(url + "/v1/completions", json={"stream": False})
            assert second.status_code == 503 and one.accepted + two.accepted == 3
    assert second.json()["error"]["code"] == "node_unavailable"


def test_an_unreachable_node_is_retried_and_two_failures_answer_503(redis: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with serve(Upstream().app()) as good_url:
        app, _ = head(redis, {A: dead, B: good_url})
        with serve(app) as url:
            for _ in range(3):
                response = httpx.post(url + "/v1/completions", json={"stream": False})
                assert response.status_code == 200 and response.headers["x-modelfleet-node"] == B
    app, _ = head(redis, {A: dead, B: dead})
    with serve(app) as url:
        response = httpx.post(url + "/v1/completions", json={"stream": False})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "node_unavailable"
    assert "failed before answering (ConnectError)" in response.json()["error"]["message"]
    assert inflight_total(redis) == 0


def test_a_client_error_of_the_node_is_passed_on_not_retried(redis: str) -> None:
    first, second = Upstream(mode="404"), Upstream(mode="404")
    with serve(first.app()) as one, serve(second.app()) as two:
        app, _ = head(redis, {A: one, B: two})
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"stream": True})
    assert response.status_code == 404 and response.json()["error"]["code"] == "y"
    assert first.requests + second.requests == 1


def test_a_node_failing_mid_stream_ends_it_with_an_error_event(redis: str) -> None:
    with serve(Upstream(mode="cut", tokens=5).app()) as node_url:
        app, state = head(redis, {A: node_url})
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"stream": True})
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    # Two tokens, the error event, then [DONE]: the stream ends as a node ends a failed one.
    assert response.status_code == 200 and len(events) == 4 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "node_unavailable"
    assert inflight_total(redis) == 0
    assert state["proxy"].cooldown.cooling(A)  # type: ignore[attr-defined]
    metrics = state["metrics"]
    assert (
        metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "modelfleet_inference_requests_total", {"model": "m", "outcome": "node_failed_mid_stream"}
        )
        == 1
    )


def test_streams_are_spread_over_the_replicas(redis: str) -> None:
    one, two = Upstream(tokens=20, gap=0.05), Upstream(tokens=20, gap=0.05)
    with serve(one.app()) as one_url, serve(two.app()) as two_url:
        app, _ = head(redis, {A: one_url, B: two_url})
        with serve(app) as url:

            async def run() -> list[str]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                    async def stream() -> str:
                        async with client.stream("POST", "/v1/completions", json={"stream": True}) as response:
                            await response.aread()
                            return response.headers["x-modelfleet-node"]

                    return await asyncio.gather(*(stream() for _ in range(10)))

            served = asyncio.run(run())
    assert sorted(served.count(fp) for fp in (A, B)) == [5, 5]


def test_cooldown_doubles_while_failures_go_on_and_an_answer_ends_it() -> None:
    now = [100.0]
    cooldown = Cooldown(2.0, cap=10.0, clock=lambda: now[0])
    assert cooldown.failed(A) == 2.0
    assert cooldown.failed(A) == 0.0  # requests under way when it was left out: the same failure
    assert cooldown.usable([A, B]) == ([B], []) and cooldown.usable([A]) == ([A], [])  # alone, still tried
    seconds = []
    for _ in range(3):  # each trial after a cooldown fails: twice as long each time, up to the cap
        now[0] += 10.5
        assert cooldown.usable([A, B]) == ([A, B], [A])  # this request is its trial
        assert cooldown.usable([A, B]) == ([B], [])  # one trial at a time
        seconds.append(cooldown.failed(A))
        cooldown.tried(A)
    assert seconds == [4.0, 8.0, 10.0]
    now[0] += 10.5
    assert cooldown.usable([A, B]) == ([A, B], [A])
    cooldown.tried(A)  # a trial that ended with no verdict (its caller left): the next request tries
    assert cooldown.usable([A, B]) == ([A, B], [A])
    cooldown.answered(A)
    assert not cooldown.cooling(A) and cooldown.failed(A) == 2.0  # an answer ended the run of failures
    off = Cooldown(0.0)
    assert off.failed(A) == 0.0 and not off.cooling(A)
