"""Run GGUF models in this process with llama.cpp (llama-cpp-python): the backend for today's architectures.

Installed with `pip install 'modelfleet[llama-cpp]'`; `workers.backends` uses it for what ctransformers cannot
run. This module imports `llama_cpp` only when a `LlamaCppBackend` is built, so the rest of the node (and
`backend_rules`) works without it.

Facts about llama-cpp-python 0.3.36 that shape this module:

- `verbose=False` silences llama.cpp by pointing file descriptors 1 and 2 at /dev/null while a model loads, for
  the whole process. Two loads doing that at once can restore each other's /dev/null and leave the worker's log
  silent for good, so loads here take `_LOAD_LOCK`. Lines other threads log during a load (milliseconds) are lost.
- llama.cpp reports why a load failed only through its log; `_LlamaLog` keeps the last errors so the failure
  says why ("unknown model architecture: ...") instead of "Failed to load model from file".
- A `Llama` is not thread-safe; the inference layer runs one call at a time per model, so none is locked here.
- It keeps K and V in F16 (`type_k`/`type_v` unset) and sizes its cache to `n_ctx` cells: see `estimate_bytes`.
- `Llama.generate` evaluates the whole prompt before its first token, so `generate` here evaluates the prompt in
  batches itself, checking for cancellation between them, and then lets `Llama.generate` sample.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import ModelLoadFailed
from workers.backend_rules import llama_cpp_problem
from workers.gguf_info import GGUFInfo, kv_cache_bytes, read_gguf_info
from workers.inference.backend import HeldModel, SamplingParams, answers

log = logging.getLogger(__name__)

NAME = "llama-cpp"
DEFAULT_CONTEXT = 512
"""`n_ctx` when a load names no context length: llama-cpp-python's default, and ctransformers' too, so a model
takes the same memory and answers the same prompts on either backend. Pass `contextLength` for more."""
KV_CACHE_BYTES_PER_VALUE = 2
"""K and V are F16 (llama-cpp-python leaves `type_k` and `type_v` at llama.cpp's default, GGML_TYPE_F16)."""
KV_CELLS_PADDING = 256
"""llama.cpp rounds the cache up to a multiple of 256 cells: `n_ctx=100` allocates 256."""
N_UBATCH = 512
"""llama-cpp-python's `n_batch` and `n_ubatch` (capped at `n_ctx`): the tokens one compute step holds."""
PROMPT_BATCH = 64
"""Prompt tokens evaluated per call: a cancelled request stops between two batches."""

_LOAD_LOCK = threading.Lock()


class _LlamaLog:
    """Keeps llama.cpp's warnings and errors of the load in progress (loads are serialized by `_LOAD_LOCK`)."""

    def __init__(self, llama_cpp: Any) -> None:
        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level in (2, 3):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                self.lines.append(text.decode(errors="replace").strip())

        self._callback = callback  # ctypes calls it from C: it must outlive every load
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def reason(self) -> str:
        errors = [line for line in self.lines if line]
        return errors[-1] if errors else "llama.cpp gave no reason"


@dataclass
class LlamaCppModel(HeldModel):
    """A model llama.cpp holds, served through `workers.inference.backend.InferenceModel`; `unload` drops `handle`.

    Not thread-safe (nor is the `Llama`): the manager's lease makes every call below one at a time. `handle` is
    a `llama_cpp.Llama`, typed Any because llama_cpp may not be installed where this module is imported.
    """

    backend: str = NAME

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        # special=True: a chat template's "<|im_start|>" must become that one token, as llama.cpp's server does.
        ids: list[int] = self._llm().tokenize(text.encode(), add_bos=add_bos, special=True)
        return ids

    def detokenize(self, ids: Sequence[int]) -> bytes:
        data: bytes = self._llm().detokenize(list(ids))
        return data

    def cached(self) -> list[int]:
        llm = self._llm()
        ids: list[int] = llm.input_ids[: llm.n_tokens].tolist()
        return ids

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Generator[int, None, None]:
        """Yield sampled token ids until an end-of-generation token (not yielded), evaluating nothing ahead.

        The cache keeps what the last call evaluated: a prompt that starts the same way (the next turn of a chat)
        evaluates only what is new.
        """
        llm = self._llm()
        ids = list(prompt_ids)
        try:
            if not self._evaluate_prompt(llm, ids, cancelled):
                return
            llm.set_seed(_seed(params.seed))
            greedy = params.temperature <= 0
            tokens = llm.generate(
                ids,
                temp=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0,  # off: only top_p narrows the choice, as in OpenAI's API
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,
            )
            try:
                vocab = _vocab(llm)
                for token in tokens:
                    if _is_eog(vocab, token):
                        return
                    yield token
            finally:
                tokens.close()
        except GeneratorExit:
            raise  # closed at a `yield`: the cache holds exactly the prompt and the tokens before this one
        except BaseException:
            llm.reset()  # what was evaluated is unknown: the next prompt is evaluated from scratch
            raise

    def _evaluate_prompt(self, llm: Any, ids: list[int], cancelled: Callable[[], bool]) -> bool:
        """Evaluate `ids` past the prefix already in the cache; False if cancelled before the end."""
        cached = self.cached()
        keep = 0
        for a, b in zip(cached, ids, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # re-evaluate at least the last token: sampling needs its logits
        if keep < llm.n_tokens:
            if getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
                keep = 0  # a recurrent state cannot be cut back to a prefix
            if keep == 0:
                llm.reset()
            else:
                llm.n_tokens = keep  # `eval` drops the cache cells from here on
        for start in range(keep, len(ids), PROMPT_BATCH):
            if cancelled():
                return False
            llm.eval(ids[start : start + PROMPT_BATCH])
        return True


def _seed(seed: int | None) -> int:
    """llama.cpp's seed for a request's: any integer (OpenAI's are 64-bit), drawn into 31 bits as the ctransformers
    backend draws its own. Given as is, llama.cpp kept its low 32 bits (5 and 2**64 + 5 sampled alike) and took
    0xFFFFFFFF (and so -1) for "pick a random seed", so those seeds did not repeat."""
    import random  # sampling, not secrets

    return random.Random(seed).randrange(1 << 31) if seed is not None else random.randrange(1 << 31)


def _vocab(llm: Any) -> Any:
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def _is_eog(vocab: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


def estimate_bytes(info: GGUFInfo, context_length: int | None) -> int:
    """The memory a model takes once it has answered a long prompt: the weights (the file, mapped), the F16 K and
    V caches for the padded context, and llama.cpp's compute buffer.

    The compute buffer holds, for one batch of `N_UBATCH` tokens, the attention scores and mask over every cell
    (F32, one score matrix per head), the logits and the activations. Measured against llama.cpp's own report
    ("CPU compute buffer size"): 12.01 MiB predicted 12.0 (n_ctx 512) and 75.01 predicted 75.0 (n_ctx 4096) for
    a 256-wide, 8-head, 512-token model; 9.76 MiB predicted 10.5 for stories260K. Right after a load the process
    has touched only the weights; the rest becomes resident as prompts fill the context.
    """
    n_ctx = context_length or DEFAULT_CONTEXT
    cells = -(-n_ctx // KV_CELLS_PADDING) * KV_CELLS_PADDING
    kv = kv_cache_bytes(info, cells, bytes_per_value=KV_CACHE_BYTES_PER_VALUE)
    n_vocab = info.tokens_at[1] if info.tokens_at is not None else 0
    n_embd, n_head = info.embedding_length or 0, info.head_count or 0
    compute = 4 * min(N_UBATCH, n_ctx) * (cells * (n_head + 1) + n_vocab + 4 * n_embd)
    return info.file_size + kv + compute


class LlamaCppBackend:
    """The llama.cpp backend (`workers.backends.Backend`): threads fixed per process, `verbose=False`."""

    name = NAME

    def __init__(self, *, threads: int) -> None:
        """Raises ImportError when llama-cpp-python is not installed."""
        import llama_cpp

        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self._llama_cpp = llama_cpp
        self.version: str = llama_cpp.__version__
        self._log = _LlamaLog(llama_cpp)

    def problem(self, info: GGUFInfo) -> str | None:
        return llama_cpp_problem(info)

    def estimate_bytes(self, info: GGUFInfo, context_length: int | None) -> int:
        return estimate_bytes(info, context_length)

    def load(self, path: Path, *, context_length: int | None, gpu_layers: int | None) -> LlamaCppModel:
        """Load the model at `path` with `n_ctx=context_length` (None: `DEFAULT_CONTEXT`); `gpu_layers=-1` means
        every layer, None none (llama.cpp's `n_gpu_layers`, which only a GPU build uses).

        Raises `InvalidModelFile` for a file whose header cannot be read, `ModelLoadFailed` with llama.cpp's own
        reason for one it refuses.
        """
        path = Path(path)
        info = read_gguf_info(path)  # whole and sane before llama.cpp, which trusts the header, sees it
        layers = 0 if gpu_layers is None else gpu_layers
        with _LOAD_LOCK:
            self._log.lines.clear()
            try:
                llm = self._llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=context_length or DEFAULT_CONTEXT,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    n_gpu_layers=layers,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelLoadFailed(
                    f"llama.cpp {self.version} could not load {path.name} as a {info.architecture!r} model: "
                    f"{self._log.reason()}",
                    architecture=info.architecture,
                ) from exc
        if layers == -1:
            layers = (info.block_count or 0) + 1  # as reported for ctransformers: the output layer counts too
        metadata: dict[str, str] = llm.metadata
        return LlamaCppModel(
            handle=llm,
            architecture=info.architecture,
            context_length=llm.n_ctx(),
            gpu_layers=layers,
            size_bytes=info.file_size,
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=_token_text(llm, llm.token_bos()),
            eos_token=_token_text(llm, llm.token_eos()),
        )

    def unload(self, model: LlamaCppModel) -> None:
        """Free the model now (`Llama.close`), not whenever the garbage collector gets to it."""
        handle, model.handle = model.handle, None
        if handle is not None:
            handle.close()
        del handle
        gc.collect()

    def check(self, model: LlamaCppModel) -> bool:
        """True if the model answers: generates a token, as on ctransformers (`workers.inference.backend.answers`)."""
        return answers(model)


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    text: bytes = llm.detokenize([token], special=True)
    return text.decode(errors="replace")
