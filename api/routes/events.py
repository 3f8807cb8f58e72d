"""`GET /api/v1/events`: the pool's changes as Server-Sent Events (see `api.events` for how they travel)."""

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from api.deps import Directory, Relay
from api.events import Subscriber
from api.openapi import guarded
from broker import errors as e
from broker.events import stream_id
from broker.operations import Scope as KeyScope

router = APIRouter(prefix="/api/v1", tags=["events"])

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INCOMPLETE = "ASGI callable returned without completing response."


class CutStreamFilter(logging.Filter):
    """uvicorn logs a response cut short as an error; a dropped slow client's is cut on purpose, and the relay
    already said why. Swallows one such line per stream we cut, logged within a second of the cut, and no other
    (uvicorn skips the line when the client went at the same moment: an old cut must not hide a later error)."""

    cuts: "deque[float]" = deque()

    @classmethod
    def cut(cls) -> None:
        cls.cuts.append(time.monotonic())

    def filter(self, record: logging.LogRecord) -> bool:
        cuts = CutStreamFilter.cuts
        while cuts and time.monotonic() - cuts[0] > 1.0:
            cuts.popleft()
        if cuts and record.getMessage() == INCOMPLETE:
            cuts.popleft()
            return False
        return True


def quiet_cut_streams() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, CutStreamFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(CutStreamFilter())


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` that ends when its body ends, the client goes, or the relay drops the client.

    A client too slow to read blocks our writes (flow control), so the relay's drop cannot wait for the next
    write: it cancels the stream from the side, and the connection is closed under it. A client that stops
    reading altogether is found by the write deadline: each write marks when it started on the subscriber
    (`writing_since`), and the relay drops a client whose write has waited longer than its `write_timeout`.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], sub: Subscriber) -> None:
        super().__init__(content, headers=HEADERS)
        self._sub = sub
        self._dropped = sub.dropped
        self._frames = content

    async def _send_watched(self, send: Send, message: Message) -> None:
        self._sub.writing_since = time.monotonic()
        try:
            await send(message)
        finally:
            self._sub.writing_since = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def until(func: Callable[[], Awaitable[object]]) -> None:
                    await func()
                    group.cancel_scope.cancel()

                group.start_soon(until, partial(self.stream_response, partial(self._send_watched, send)))
                group.start_soon(until, partial(self.listen_for_disconnect, receive))
                group.start_soon(until, self._dropped.wait)
        finally:
            await self._frames.aclose()  # type: ignore[attr-defined]
            if self._dropped.is_set():
                CutStreamFilter.cut()


STREAM = {
    "description": "A `snapshot` event (or, on a resume, the missed events), then `distributed-pool-changed` "
    "events, each one `event:`, `id:` and a JSON `data:` line; `model-usage` events (an `event:` and a JSON "
    "`data:` line, no `id:`) while prompts run; and `:` comment pings while the pool is quiet.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@router.get(
    "/events",
    response_class=EventStreamResponse,
    status_code=200,  # FastAPI cannot read it off a response class whose __init__ has no status_code
    summary="Follow the pool's changes",
    **guarded(
        KeyScope.READ,
        e.InvalidRequest,
        e.NodeNotFound,
        e.NodeUnavailable,
        e.ShuttingDown,
        streaming=True,
        openapi_extra={"responses": {"200": STREAM}},
    ),
)
async def events(
    relay: Relay,
    directory: Directory,
    node: Annotated[str | None, Query(description="Only this node's events (a fingerprint).")] = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
    resume_after: Annotated[
        str | None,
        Query(
            alias="lastEventId",
            description="Resume after this event id, for a client that cannot set the header (a browser's new "
            "EventSource after its old one gave up). The header wins when both are sent.",
        ),
    ] = None,
) -> EventStreamResponse:
    """Every change of the pool, as `distributed-pool-changed` events, after a `snapshot` of where it stands.

    With `Last-Event-ID` still in the retained history, the missed events come first instead of the snapshot.

    While prompts run, `model-usage` events carry each node's usage: `{"type": "model-usage", "node", "at",
    "models": [{"modelId", "inFlight", "queued", "tokensGenerated", "lastUsed"}]}`, at most one a second per
    node while it changes and one after the last change. They have no `id:` (they are gauges, not history: never
    replayed, and a snapshot already holds the latest figures) and a name of their own, so a client that
    refreshes on every `distributed-pool-changed` never sees them. `node` filters them as it filters the rest.
    """
    last_event_id = last_event_id if last_event_id is not None else resume_after
    if node is not None:
        await directory.get(node)  # 404 for an unknown node, before the stream starts
    await relay.ensure_cursor()
    sub = relay.open(node)  # before the read below: see api.events
    try:
        if last_event_id is not None and await relay.can_replay(last_event_id):
            first, replay_after = None, last_event_id
        else:
            first, replay_after = await relay.snapshot(node), None
    except BaseException:
        relay.close(sub)
        raise
    assert replay_after is None or stream_id(replay_after) is not None
    return EventStreamResponse(relay.frames(sub, first, replay_after), sub)
