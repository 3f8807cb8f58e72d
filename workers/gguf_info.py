"""What a GGUF file says about its model, read once per version of the file: the facts every backend needs to
decide whether it can run the model and how much memory that takes.

Backend-neutral: nothing here imports a backend. `workers.backends` decides from a `GGUFInfo`, before loading
anything, which backend takes a file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from broker.errors import InvalidModelFile
from workers.gguf_header import GGUF_MAGIC, read_header


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about the model. A number is None if the header does not have it."""

    architecture: str
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    file_size: int
    tensor_types: frozenset[int] = frozenset()
    tokenizer_model: str | None = None
    tokenizer_pre: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tokens_at: tuple[int, int] | None = None

    def type_names(self, types: frozenset[int] | set[int]) -> str:
        """`types` as ggml names, sorted, for messages ("IQ2_XS, Q4_0")."""
        return ", ".join(sorted(_type_name(t) for t in types))


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the header of the GGUF file at `path`, once per version of the file.

    A load needs it more than once (backend choice, memory estimate, model type) and the catalog reads every
    file, so results are cached by path, size and mtime. `read_header` skips the vocabulary, so a miss costs
    milliseconds.
    """
    stat = Path(path).stat()
    return _read_gguf_info(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_gguf_info(path_text: str, size: int, mtime_ns: int) -> GGUFInfo:
    """Read the header of the GGUF file at `path`.

    Raises `InvalidModelFile` if the file is not GGUF, if its header cannot be parsed, or if its tensors do not
    fit in the file. OSError (a missing or unreadable file) is not caught.
    """
    path = Path(path_text)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InvalidModelFile(f"{path.name} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")
    try:
        facts = read_header(path)
        if not facts.architecture:
            raise ValueError("general.architecture is missing")
    except ValueError as exc:
        raise InvalidModelFile(
            f"{path.name} is damaged: its GGUF header cannot be read ({type(exc).__name__}: {exc}). "
            "Download or convert the model again."
        ) from exc
    return GGUFInfo(
        architecture=facts.architecture,
        context_length=facts.context_length,
        block_count=facts.block_count,
        embedding_length=facts.embedding_length,
        head_count=facts.head_count,
        head_count_kv=facts.head_count_kv,
        file_size=path.stat().st_size,
        tensor_types=facts.tensor_types,
        tokenizer_model=facts.tokenizer_model,
        tokenizer_pre=facts.tokenizer_pre,
        chat_template=facts.chat_template,
        bos_token_id=facts.bos_token_id,
        eos_token_id=facts.eos_token_id,
        tokens_at=facts.tokens_at,
    )


def kv_cache_bytes(info: GGUFInfo, context_length: int, *, bytes_per_value: float) -> int:
    """Bytes of the K and V caches for `context_length` tokens, each value taking `bytes_per_value`.

    Raises `InvalidModelFile` if the header lacks the layer count, embedding length or head count.
    """
    if info.block_count is None or info.embedding_length is None or info.head_count is None:
        raise InvalidModelFile(
            f"the {info.architecture} header lacks block_count, embedding_length or head_count, "
            "so the memory its cache needs is unknown"
        )
    head_count_kv = info.head_count_kv if info.head_count_kv is not None else info.head_count
    n_embd_kv = info.embedding_length * head_count_kv // info.head_count
    return int(2 * info.block_count * context_length * n_embd_kv * bytes_per_value)
