"""The proxy follows the node process it streams from: a node restarted or gone mid-stream ends the stream with
an OpenAI error event within a liveness tick (no FIN needed), and one gone before its first byte has the
request retried on another replica. Real uvicorn servers as the nodes' endpoints, node records in a real
redis-server."""

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis import Redis as SyncRedis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from api.proxy import _OnLoss
from broker import keys
from tests.api.test_proxy import Upstream, head, serve
from tests.api.test_routing import A, B


def silent_node(released: threading.Event) -> Starlette:
    """A node that takes the request and never answers (a frozen machine: no byte, no FIN)."""

    async def complete(request: Request) -> Response:
        await request.body()

        async def nothing() -> AsyncIterator[bytes]:
            while not released.is_set():
                await asyncio.sleep(0.05)
            yield b""

        return StreamingResponse(nothing(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])])


def test_a_node_restarted_mid_stream_ends_the_stream_with_an_error_event(redis: str) -> None:
    slow = Upstream(tokens=200, gap=0.2)  # a 40 s answer
    with serve(slow.app()) as node_url, serve(head(redis, {A: node_url}, liveness_tick=0.1)[0]) as url:
        client = SyncRedis.from_url(redis)
        started = time.monotonic()
        events: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json={"stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2:
                        client.set(keys.node_alive(A), "a-new-boot")  # the node's process was replaced
        elapsed = time.monotonic() - started
    print(f"\nstream ended {elapsed:.1f}s in, after {len(events)} events of 201")
    assert 2 <= len(events) < 20, events  # ended within a few ticks, not after the node's 200 tokens
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["code"] == "node_restarted" and "restarted" in error["message"], error
    assert slow.closed.wait(5), "the node's stream was not closed"


def test_a_node_gone_before_its_first_byte_is_retried_on_another_replica(redis: str) -> None:
    released = threading.Event()
    try:
        with (
            serve(silent_node(released)) as silent_url,
            serve(Upstream().app()) as good_url,
            serve(head(redis, {A: silent_url, B: good_url}, liveness_tick=0.1, busy=(B,))[0]) as url,
        ):
            client = SyncRedis.from_url(redis)

            def go_offline() -> None:
                time.sleep(0.5)
                client.delete(keys.node_alive(A))  # its heartbeat lapsed; its registration stays

            threading.Thread(target=go_offline, daemon=True).start()
            response = httpx.post(url + "/v1/completions", json={"stream": True}, timeout=30)
    finally:
        released.set()
    assert response.status_code == 200, response.text
    assert response.headers["x-modelfleet-node"] == B
    assert response.text.endswith("data: [DONE]\n\n")


def test_a_loss_is_told_apart_from_the_callers_own_cancellation() -> None:
    """`_OnLoss`'s bookkeeping of the task's cancellations, on the event loop alone."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def lost_node() -> "asyncio.Future[None]":
            watch: asyncio.Future[None] = loop.create_future()
            watch.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning
            return watch

        # The loss cancels a wait: taken back, and told as the loss.
        watch = lost_node()
        loss = _OnLoss(watch)
        loop.call_later(0.01, watch.set_exception, RuntimeError("node gone"))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(5)
        assert loss.took_effect() and str(loss) == "node gone"
        loss.stop()
        assert task.cancelling() == 0

        # Its cancellation swallowed by a cleanup on the way (as `_shielded` does): none is left counted.
        watch = lost_node()
        loss = _OnLoss(watch)
        with contextlib.suppress(asyncio.CancelledError):
            watch.set_exception(RuntimeError("node gone"))
            await asyncio.sleep(5)
        loss.stop()
        assert task.cancelling() == 0

        # The caller leaves at the same moment: its cancellation goes on.
        watch = lost_node()
        loss = _OnLoss(watch)
        watch.set_exception(RuntimeError("node gone"))
        loop.call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(5)
        assert not loss.took_effect()
        loss.stop()
        assert task.uncancel() == 0  # the caller's, left for its own handler

        # A callback already scheduled when the watch stopped cancels nothing later.
        watch = lost_node()
        loss = _OnLoss(watch)
        watch.set_exception(RuntimeError("node gone"))
        loss.stop()
        await asyncio.sleep(0.01)
        assert task.cancelling() == 0

    asyncio.run(run())
