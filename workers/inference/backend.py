"""What a backend's loaded model must offer to be served: the whole contract between the routes and a backend.

A backend (ctransformers in `workers.backend`, llama.cpp in `workers.llama_backend`) implements `InferenceModel`
on the object its loader returns. Everything above token ids is generic and lives in `workers.inference.text`:
incremental UTF-8 decoding, stop strings, `max_tokens` and `finish_reason`, usage counting, cancellation, chat
templates.

Rules a backend follows:
- One call at a time per model: the manager's lease serializes every call below, so a backend needs no lock.
- `generate` yields sampled token ids one by one and returns (without yielding it) at an end-of-generation
  token. It never evaluates more than the caller consumes: the next token is computed only when asked for, so
  a caller that stops iterating (or closes the generator) costs at most the token in progress. Closing it keeps
  what it evaluated (the prompt and the tokens fed back) cached for the next prompt that starts the same way.
- `temperature == 0` means greedy decoding; `seed` makes sampling repeatable; `top_p` is nucleus sampling.
- The caller guarantees `len(prompt_ids) + tokens asked for <= context_length`.
"""

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.errors import ModelNotLoaded


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """None: a different draw every request."""


@runtime_checkable
class InferenceModel(Protocol):
    """A loaded model that can tokenize and generate. See the module docstring for the rules."""

    @property
    def context_length(self) -> int: ...

    @property
    def chat_template(self) -> str | None:
        """The GGUF's `tokenizer.chat_template` (Jinja2), or None if it has none."""

    @property
    def bos_token(self) -> str:
        """The text of the BOS token, for chat templates (`bos_token`); "" if unknown."""

    @property
    def eos_token(self) -> str:
        """The text of the EOS token, for chat templates (`eos_token`); "" if unknown."""

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """The bytes of these tokens (a multi-byte character may be split across tokens)."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Generator[int, None, None]: ...

    def cached(self) -> list[int]:
        """The token ids the model's cache holds now; empty if none (`HeldModel`'s default)."""


@dataclass
class HeldModel:
    """What every backend keeps of a model in memory, beside its library's handle; `unload` sets `handle` to None.

    Each backend's model subclasses it and adds `tokenize`, `detokenize` and `generate` (`InferenceModel`).
    """

    handle: Any
    architecture: str
    context_length: int
    gpu_layers: int
    size_bytes: int
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def _llm(self) -> Any:
        if self.handle is None:
            raise ModelNotLoaded("The model was unloaded.")
        return self.handle

    def cached(self) -> list[int]:
        """The token ids the model's cache holds now (what the last generation evaluated); empty if none."""
        return []


def answers(model: InferenceModel) -> bool:
    """Whether the model answers: it generates one token (end of text counts) from what its cache holds, or else
    from a letter.

    What `healthy` means on every backend, and cheap: one token evaluated (the cache's last, which a generation
    re-evaluates anyway to sample from it), one sampled. Asked with the cached tokens, the check leaves the cache
    as it found it, so the next turn of a chat still evaluates only what is new. Call it under the model's lease,
    like every call on the model.
    """
    try:
        ids = model.cached() or model.tokenize("a", add_bos=True)
        if not ids or len(ids) + 1 > model.context_length:
            # A context with no room for a letter and one token answers no prompt; asking anyway would evaluate
            # past it (ctransformers only prints a warning, and writes beyond its cache).
            return False
        tokens = model.generate(ids, SamplingParams(temperature=0), lambda: False)
        try:
            next(tokens, None)
        finally:
            tokens.close()
    except Exception:  # any failure (an unloaded model included) means the model is not usable, which is the answer
        return False
    return True
