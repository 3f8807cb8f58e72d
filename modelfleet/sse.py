"""Reading `GET /api/v1/events`: the Server-Sent Events wire format, decoded line by line into typed events.

`SseDecoder` is transport-free (the sync and async clients feed it the text httpx decodes) and follows the
WHATWG rules that matter here: lines end at CR, LF or CRLF and nowhere else (not at U+2028 or U+0085, which
`str.splitlines` would split on); `event:`, `data:` (joined with newlines), `id:`, `retry:`, comments (`:`); a
blank line dispatches the event, and only then does its id become the last event id, so a connection cut
mid-event resumes before that event, not after it.

A `snapshot` event becomes a `Snapshot`, a `distributed-pool-changed` one a `ModelEvent` or `NodeEvent`, a
`model-usage` one (no id: it leaves the last event id as it was) a `UsageEvent`; an
event type or pool-event type this version does not know is passed on with `data` None and its JSON in `raw`,
so that a newer API does not break an older client's stream.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from broker.events import (
    SNAPSHOT_EVENT,
    SSE_EVENT,
    USAGE_EVENT,
    ModelEvent,
    NodeEvent,
    Snapshot,
    UsageEvent,
    parse_event,
    parse_usage,
)
from broker.schemas import read_lenient

LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class StreamEvent:
    """One event of the stream: its id (what `Last-Event-ID` resumes after), its SSE type and its content."""

    id: str | None
    kind: str
    """`snapshot`, `distributed-pool-changed` or `model-usage` (or a type a newer API added)."""
    data: Snapshot | ModelEvent | NodeEvent | UsageEvent | None
    """None for a type this client does not know; `raw` still holds it."""
    raw: Any = field(repr=False, default=None)


class SseDecoder:
    """Turns SSE lines into `StreamEvent`s; remembers the last event id and the server's `retry:` advice."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry: float | None = None
        """Seconds the server asked a client to wait before reconnecting, if it said."""
        self.reset()

    def reset(self) -> None:
        """Forget a half-read event and line: a new connection starts clean."""
        self._kind = ""
        self._data: list[str] = []
        self._id = self.last_event_id
        self._partial: list[str] = []
        self._after_cr = False

    def feed_text(self, text: str) -> list[StreamEvent]:
        """A chunk of the stream's text, cut anywhere; returns the events it completes. Linear in the text: a
        long line (a big pool's snapshot) arriving in many chunks is joined once, when it ends."""
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF whose CR ended the previous chunk
        self._after_cr = False
        events = []
        pos = 0
        for match in LINE_END.finditer(text):
            line = "".join([*self._partial, text[pos : match.start()]]) if self._partial else text[pos : match.start()]
            self._partial = []
            if (event := self.feed(line)) is not None:
                events.append(event)
            pos = match.end()
            self._after_cr = match.group() == "\r" and pos == len(text)
        if pos < len(text):
            self._partial.append(text[pos:])
        return events

    def feed(self, line: str) -> StreamEvent | None:
        """One line, without its line ending; returns the event that a blank line completes."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
        return None

    def _dispatch(self) -> StreamEvent | None:
        kind, data = self._kind or "message", self._data
        self._kind, self._data = "", []
        self.last_event_id = self._id
        if not data:
            return None
        text = "\n".join(data)
        try:
            raw = json.loads(text)
        except ValueError:
            raw = text
        return StreamEvent(self.last_event_id, kind, _typed(kind, text), raw)


def _typed(kind: str, text: str) -> Snapshot | ModelEvent | NodeEvent | UsageEvent | None:
    try:
        if kind == SNAPSHOT_EVENT:
            return read_lenient(Snapshot, text)
        if kind == SSE_EVENT:
            return parse_event(text)
        if kind == USAGE_EVENT:
            return parse_usage(text)
    except (ValidationError, ValueError):
        return None
    return None
