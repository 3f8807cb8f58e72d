"""Run GGUF models in this process with ctransformers: read headers, estimate memory, load, check and unload.

This module knows nothing about Celery or Redis. The worker's model manager gets a `CTransformersLoader` and
calls it.

Facts about ctransformers 0.2.27 that shape this module:

- Without `lib=`, every load spends about 1 s detecting CPU features in a subprocess. `choose_lib` decides once.
- A GGUF file with a truncated header makes ctransformers segfault. A file with truncated weights loads and
  then crashes when the missing pages are touched. `read_gguf_info` parses the whole header and checks that
  every tensor fits in the file, so `load` calls it first.
- `LLM.tokenize` and `LLM.__call__` write tokens into a buffer of `len(text) + 1` ints. A prompt that needs
  more tokens corrupts the heap: think of emoji that fall back to byte tokens, or any model with a tiny
  vocabulary. `safe_tokenize` gives llama.cpp a buffer big enough for any text.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import platform
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctransformers import LLM, Config
from ctransformers.lib import find_library

from broker.errors import InvalidModelFile, InvalidRequest
from workers.backend_rules import ctransformers_problem
from workers.gguf_header import read_token_texts
from workers.gguf_info import GGUFInfo, kv_cache_bytes, read_gguf_info
from workers.inference.backend import HeldModel, SamplingParams, answers

NAME = "ctransformers"
CTRANSFORMERS_DEFAULT_CONTEXT = 512
"""The context length ctransformers uses when none is given. It ignores `<arch>.context_length` in the header."""
KV_CACHE_BYTES_PER_VALUE = 2
"""llama.cpp in ctransformers 0.2.27 keeps K and V in F16: `llama_context_default_params()` sets `f16_kv = true`,
and ctransformers does not change it. Measured: eight more layers at 4096 context and embedding 256 added
32.5 MB of address space beyond the extra weights. F16 predicts 33.5 MB, F32 would be 67 MB."""
PROMPT_BATCH = 64
"""Prompt tokens evaluated per call: a cancelled request stops between two batches."""


@functools.cache
def choose_lib() -> str:
    """Return the ctransformers build to pass as `lib=`: "avx2", "avx" or "basic". Decided once per process.

    The CPU flags come from /proc/cpuinfo, which is fast. If it cannot be read, or the machine is not x86,
    `ctransformers.lib.find_library()` decides instead (about 1 s), and this returns the path of the library
    it chose.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return find_library()
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return find_library()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    if "avx2" in flags:
        return "avx2"
    # The same rule as find_library: its "avx" build also uses F16C instructions.
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic"


LIBS = ("auto", "cuda", "avx2", "avx", "basic")


def gpu_visible() -> bool:
    """Whether the NVIDIA driver shows a GPU to this process (a container without one shows none)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


@functools.cache
def cuda_problem() -> str | None:
    """Why the CUDA build cannot be used here, or None if it loads (CUDA runtime and cuBLAS found)."""
    from ctransformers.llm import load_library

    try:
        load_library("cuda")
    except OSError as exc:
        return f"{exc}".splitlines()[0] or type(exc).__name__
    return None


def resolve_lib(requested: str = "auto") -> str:
    """The ctransformers build for `lib=`: "auto" takes CUDA when a GPU is visible and the CUDA build loads,
    else the best CPU build; "cuda" insists on it (an error that says what is missing otherwise)."""
    if requested not in LIBS:
        raise ValueError(f"unknown ctransformers build {requested!r}; choose one of {', '.join(LIBS)}")
    if requested == "cuda":
        problem = cuda_problem()
        if problem:
            raise RuntimeError(
                f"the CUDA build of ctransformers cannot be loaded ({problem}); "
                "install its runtime with `pip install 'ctransformers[cuda]'`, or use --lib auto"
            )
        return "cuda"
    if requested == "auto":
        return "cuda" if gpu_visible() and cuda_problem() is None else choose_lib()
    return requested


def estimate_kv_cache_bytes(info: GGUFInfo, context_length: int) -> int:
    """Bytes of the K and V caches ctransformers' llama.cpp allocates for `context_length` tokens (F16).

    Raises `InvalidModelFile` if the header lacks the layer count, embedding length or head count.
    """
    return kv_cache_bytes(info, context_length, bytes_per_value=KV_CACHE_BYTES_PER_VALUE)


def estimate_memory_bytes(path: Path, context_length: int | None) -> int:
    """Estimate the memory that loading `path` takes: the weights (the file size) plus the K and V caches.

    `context_length=None` means the ctransformers default (512), not the context length in the header.
    llama.cpp's compute buffers are not counted. They grow with the context length too.
    """
    return estimate_bytes(read_gguf_info(path), context_length)


def estimate_bytes(info: GGUFInfo, context_length: int | None) -> int:
    """`estimate_memory_bytes` from a header already read."""
    return info.file_size + estimate_kv_cache_bytes(info, context_length or CTRANSFORMERS_DEFAULT_CONTEXT)


def safe_tokenize(llm: LLM, text: str, *, add_bos: bool = True) -> list[int]:
    """Tokenize `text` like `llm.tokenize`, with a buffer that is big enough for any text.

    Each UTF-8 byte costs at most three tokens (a space becomes the three bytes of "▁"). The leading "▁" that
    llama.cpp adds and BOS cost at most four more. ctransformers reads the text as a C string, so it would end
    the prompt at its first NUL character without a word: such a text is refused instead.
    """
    if "\x00" in text:
        raise InvalidRequest(
            f"The prompt holds a NUL character (U+0000) at position {text.index(chr(0))}, which the ctransformers "
            "backend cannot read (it would end the prompt there): remove it, or load the model with the "
            "llama-cpp backend."
        )
    raw = text.encode()
    buffer = (ctypes.c_int * (3 * len(raw) + 4))()
    n_tokens = llm.ctransformers_llm_tokenize(raw, add_bos, buffer)
    return list(buffer[:n_tokens])


@dataclass
class LoadedModel(HeldModel):
    """A model in memory, served through `workers.inference.backend.InferenceModel`.

    `handle` is the ctransformers LLM; `unload` sets it to None. Not thread-safe (nor is the LLM): the manager's
    lease makes every call below one at a time.
    """

    handle: LLM | None

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return safe_tokenize(self._llm(), text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        llm = self._llm()
        if len(ids) == 1:  # a generation's every token: no generator, no join
            return bytes(llm.ctransformers_llm_detokenize(ids[0]))
        return b"".join(llm.ctransformers_llm_detokenize(i) for i in ids)

    def cached(self) -> list[int]:
        return list(self._llm()._context)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Generator[int, None, None]:
        llm = self._llm()
        # ctransformers reseeds its sampler with the seed it is given on every call, so one seed per token,
        # drawn from the request's seed, keeps a seeded answer repeatable without repeating the same draw.
        draws = random.Random(params.seed)
        greedy = params.temperature <= 0
        try:
            # Keep the cached prefix that this prompt shares with the last one (what `LLM.generate` does).
            todo = llm.prepare_inputs_for_generation(list(prompt_ids), reset=True)
            for start in range(0, len(todo), PROMPT_BATCH):
                if cancelled():
                    return
                llm.eval(todo[start : start + PROMPT_BATCH])
            while True:
                token = llm.sample(
                    top_k=1 if greedy else llm.vocab_size,
                    top_p=1.0 if greedy else params.top_p,
                    temperature=1.0 if greedy else params.temperature,
                    repetition_penalty=1.0,
                    seed=draws.randrange(1 << 31),
                )
                if llm.is_eos_token(token):
                    return
                yield token
                # Evaluated only when the caller asks for the next token: a stopped caller costs nothing more.
                llm.eval([token])
        except GeneratorExit:
            raise  # closed at a `yield`: the cache holds exactly the prompt and the tokens before this one
        except BaseException:
            llm._context.clear()  # what was evaluated is unknown: the next prompt is evaluated from scratch
            raise

    backend: str = NAME


class CTransformersLoader:
    """The ctransformers backend (`workers.backends.Backend`): threads and library fixed per process."""

    name = NAME

    def __init__(self, *, threads: int, lib: str | None = None) -> None:
        if threads < 1:
            # ctransformers would pick a number itself for -1; the node's settings decide instead.
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.lib = lib if lib is not None else choose_lib()

    def problem(self, info: GGUFInfo) -> str | None:
        return ctransformers_problem(info)

    def estimate_bytes(self, info: GGUFInfo, context_length: int | None) -> int:
        return estimate_bytes(info, context_length)

    def load(self, path: Path, *, context_length: int | None, gpu_layers: int | None) -> LoadedModel:
        """Load the model at `path`.

        `context_length=None` keeps the ctransformers default (`CTRANSFORMERS_DEFAULT_CONTEXT`), whatever the
        header says.
        `gpu_layers=-1` means every layer, and None means none. Raises `InvalidModelFile` if the file is not
        a model that ctransformers can load.
        """
        path = Path(path)
        info = read_gguf_info(path)
        if gpu_layers is None:
            layers = 0
        elif gpu_layers == -1:
            layers = (info.block_count or 0) + 1  # +1: llama.cpp counts the output layer too
        else:
            layers = gpu_layers
        config = Config(threads=self.threads, gpu_layers=layers)
        if context_length is not None:
            config.context_length = context_length
        try:
            llm = LLM(str(path), info.architecture, config=config, lib=self.lib)
        except (RuntimeError, ValueError, OSError) as exc:
            raise InvalidModelFile(
                f"ctransformers could not load {path.name} as a {info.architecture!r} model: either the file is "
                "damaged or ctransformers 0.2.27 does not support that architecture"
            ) from exc
        special = [i for i in (info.bos_token_id, info.eos_token_id) if i is not None]
        texts = read_token_texts(path, info.tokens_at, special) if special else {}
        return LoadedModel(
            handle=llm,
            architecture=info.architecture,
            context_length=llm.context_length,
            gpu_layers=layers,
            size_bytes=info.file_size,
            chat_template=info.chat_template,
            bos_token=texts.get(info.bos_token_id, "") if info.bos_token_id is not None else "",
            eos_token=texts.get(info.eos_token_id, "") if info.eos_token_id is not None else "",
        )

    def unload(self, model: LoadedModel) -> None:
        """Drop the model's handle and collect garbage, so that its memory goes back to the system.

        The memory is only freed if nothing else holds a reference to `model.handle`.
        """
        model.handle = None
        gc.collect()

    def check(self, model: LoadedModel) -> bool:
        """Return True if the model answers (`workers.inference.backend.answers`)."""
        return answers(model)
