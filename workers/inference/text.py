"""From token ids to text: one generation's deltas, stop strings, `max_tokens`, finish reason and usage.

Backend-neutral: it drives any `InferenceModel`. Text goes out as soon as it is certain: a multi-byte character
waits for its last byte (an incremental UTF-8 decoder), and text that could be the start of a stop string waits
until it is known not to be one, so a stop string never leaks out in pieces.
"""

import codecs
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

from broker.errors import ContextLengthExceeded
from workers.inference.backend import InferenceModel, SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_SAMPLING = SamplingParams()
"""OpenAI's default for `/v1/completions`; chat answers default to the rest of the context."""


def token_budget(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """How many tokens may be generated: `max_tokens`, or the rest of the context if None.

    Raises ContextLengthExceeded, naming both numbers, if the prompt and `max_tokens` do not fit in the context.
    """
    room = context_length - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise ContextLengthExceeded(
                f"The prompt is {prompt_tokens} tokens, which leaves no room in this model's context of "
                f"{context_length} tokens. Shorten the prompt, or load the model with a larger context.",
                prompt_tokens=prompt_tokens,
                context_length=context_length,
            )
        return room
    if prompt_tokens + max_tokens > context_length:
        raise ContextLengthExceeded(
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {prompt_tokens + max_tokens} "
            f"tokens, more than this model's context of {context_length} tokens. Shorten the prompt, lower "
            "max_tokens, or load the model with a larger context.",
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_length=context_length,
        )
    return max_tokens


class TextGeneration:
    """Iterate to get text deltas; afterwards `finish_reason` and `completion_tokens` say how it ended.

    `cancelled` is checked before each token: once it returns True the generation stops within one token,
    with `finish_reason == "cancelled"`.
    """

    def __init__(
        self,
        model: InferenceModel,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        params: SamplingParams = DEFAULT_SAMPLING,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._model = model
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.stop = tuple(s for s in stop if s)
        self.params = params
        self._cancelled = cancelled
        self.finish_reason: FinishReason | None = None
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # decoded text held back: it might begin a stop string
        tokens = self._model.generate(self.prompt_ids, self.params, self._cancelled)
        try:
            while True:
                if self._cancelled():
                    self.finish_reason = "cancelled"
                    return
                if self.completion_tokens >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                token = next(tokens, None)
                if token is None:
                    self.finish_reason = "stop"  # the model's end-of-generation token
                    break
                self.completion_tokens += 1
                pending += decoder.decode(self._model.detokenize([token]))
                if not self.stop:  # the common case, per token: nothing to look for, nothing to hold back
                    if pending:
                        yield pending
                        pending = ""
                    continue
                cut = self._find_stop(pending)
                if cut is not None:
                    self.finish_reason = "stop"
                    if pending[:cut]:
                        yield pending[:cut]
                    return
                keep = self._held_back(pending)
                if len(pending) > keep:
                    yield pending[: len(pending) - keep]
                    pending = pending[len(pending) - keep :]
        finally:
            tokens.close()  # a backend stops here: nothing more is evaluated
        pending += decoder.decode(b"", final=True)
        cut = self._find_stop(pending)
        if cut is not None:
            self.finish_reason = "stop"
            pending = pending[:cut]
        if pending:
            yield pending

    def _find_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """The length of the longest end of `text` that is a proper start of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
