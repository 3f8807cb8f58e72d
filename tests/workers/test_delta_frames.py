"""The node's per-token SSE frames: printed from a template, they must be the chunk model's own JSON."""

import json

import pytest

from broker.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    sse_data,
)
from workers.inference.server import _DeltaFrames

TEXTS = ["", " Lily", 'say "hi"\\n', "line\nbreak\ttab\r", "\x00\x01\x1f\x7f", "é日本😀", "\u2028", "</script>"]


def completion(text: str) -> CompletionResponse:
    choice = CompletionChoice(text=text, finish_reason=None)
    return CompletionResponse(id="cmpl-1", created=1, model="modelfleet-delta-6c1f0e2a", choices=[choice])


def chat(text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(delta=ChatDelta(content=text))
    return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[choice])


@pytest.mark.parametrize("make", [completion, chat])
@pytest.mark.parametrize("text", TEXTS)
def test_a_frame_is_the_chunk_models_own_serialization(make: object, text: str) -> None:
    frames = _DeltaFrames(make(_DeltaFrames.MARK))  # type: ignore[operator]
    made, expected = frames(text), sse_data(make(text))  # type: ignore[operator]
    assert made.startswith(b"data: ") and made.endswith(b"\n\n")
    assert json.loads(made[6:]) == json.loads(expected[6:])
    assert made == expected  # byte for byte: same escapes as pydantic's serializer
