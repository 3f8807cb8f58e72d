"""One inference request on this node, free of HTTP: take the model's lease, build the prompt, generate.

`InferenceRunner.run` runs in a thread of its own (generation blocks in C) and reports through `emit`:
`Started` once the model is this request's and the prompt fits, then `Delta`s, then exactly one `Finished` or
`Failed`, whatever happens (a caller always learns how its request ended, even one that left).
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import GenerationFailed, InvalidRequest, ModelfleetError, ModelNotLoaded, ShuttingDown
from broker.openai import ChatCompletionRequest, CompletionRequest, FinishReason, Usage
from workers.inference.backend import InferenceModel, SamplingParams
from workers.inference.chat import render_chat
from workers.inference.text import COMPLETION_DEFAULT_MAX_TOKENS, TextGeneration, token_budget
from workers.inference.watchdog import Interrupted
from workers.manager import GenerationCancelled, Lease, ModelManager

log = logging.getLogger(__name__)

InferenceRequest = CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: ModelfleetError


Event = Started | Delta | Finished | Failed


class CallerLeft(ModelfleetError):
    """The caller disconnected; nobody reads this (it only ends the request's events)."""

    code = "caller_left"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    stop: tuple[str, ...]
    max_tokens: int


class InferenceRunner:
    """Runs requests against the models of one node's `ModelManager`."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def cancel(self, cancelled: threading.Event) -> None:
        """Stop the request that was given `cancelled`: within one token if it runs, at once if it is queued."""
        cancelled.set()
        self._manager.wake()

    def run(self, request: InferenceRequest, emit: Callable[[Event], None], cancelled: threading.Event) -> None:
        try:
            lease = self._manager.acquire(request.model, cancelled=cancelled)
        except GenerationCancelled:
            emit(Failed(CallerLeft("The caller left while its request was queued.")))
            return
        except ModelfleetError as exc:
            emit(Failed(exc))
            return
        with lease:
            emit(self._generate(lease, request, emit, cancelled))

    def _generate(
        self, lease: Lease, request: InferenceRequest, emit: Callable[[Event], None], cancelled: threading.Event
    ) -> Finished | Failed:
        model: InferenceModel = lease.model
        generation: TextGeneration | None = None
        try:
            prompt = self._prompt(model, request, stopped=lambda: cancelled.is_set() or lease.stopped)
            generation = TextGeneration(
                model,
                prompt.ids,
                max_tokens=prompt.max_tokens,
                stop=prompt.stop,
                params=SamplingParams(
                    temperature=_temperature(request),
                    top_p=request.top_p or 1.0,  # 0 is greedy (the temperature above): nothing left to cut
                    seed=request.seed,
                ),
                cancelled=lambda: cancelled.is_set() or lease.stopped,
            )
            emit(Started(prompt_tokens=len(prompt.ids)))
            for text in generation:
                lease.tokens = generation.completion_tokens
                emit(Delta(text))
        except ModelfleetError as exc:
            return Failed(exc)
        except Interrupted:  # the chat template was still rendering
            return self._stopped(request, cancelled, lease)
        except Exception as exc:
            lease.failed = True
            log.exception("generation on %s failed", request.model)
            return Failed(GenerationFailed(f"Model {request.model} failed while generating: {type(exc).__name__}."))
        finally:
            if generation is not None:
                lease.tokens = generation.completion_tokens
        if generation.finish_reason == "cancelled":
            return self._stopped(request, cancelled, lease)
        assert generation.finish_reason is not None
        return Finished(generation.finish_reason, Usage.of(generation.prompt_tokens, generation.completion_tokens))

    def _stopped(self, request: InferenceRequest, cancelled: threading.Event, lease: Lease) -> Failed:
        """Why a generation was stopped: its caller left, the node is stopping, or its model was unloaded."""
        if cancelled.is_set():
            return Failed(CallerLeft("The caller left."))
        if self._manager.closing:
            return Failed(ShuttingDown(f"The node stopped during the generation of {request.model}."))
        return Failed(ModelNotLoaded(f"Model {request.model} was unloaded from this node during the generation."))

    @staticmethod
    def _prompt(model: InferenceModel, request: InferenceRequest, *, stopped: Callable[[], bool]) -> Prompt:
        if isinstance(request, ChatCompletionRequest):
            chat = render_chat(
                request.messages,
                template=model.chat_template,
                bos_token=model.bos_token,
                eos_token=model.eos_token,
                stopped=stopped,
            )
            ids = model.tokenize(chat.text, add_bos=True)
            stop = chat.stop + request.stop_sequences
            limit = request.token_limit
        else:
            prompt = request.prompt
            if isinstance(prompt, list):
                if prompt and not isinstance(prompt[0], str):  # `unsupported` refuses them first
                    raise InvalidRequest("Token-id prompts are not supported: send the prompt as text.")
                prompt = str(prompt[0]) if prompt else ""
            ids = model.tokenize(prompt, add_bos=True)
            stop = request.stop_sequences
            limit = request.max_tokens if request.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        return Prompt(ids=ids, stop=stop, max_tokens=token_budget(len(ids), limit, model.context_length))


def _temperature(request: InferenceRequest) -> float:
    """The request's temperature: OpenAI's default 1, and 0 (greedy) when `top_p` is 0, which keeps only the most
    likely token."""
    if request.top_p == 0:
        return 0.0
    return 1.0 if request.temperature is None else request.temperature
