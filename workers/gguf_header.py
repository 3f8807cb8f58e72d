"""Read what modelfleet needs from a GGUF header in milliseconds, and check that the file is whole.

`gguf.GGUFReader` builds a numpy view for every element of every array, so the header of a real model (32k
token strings, their scores and their types) takes over a second. `read_header` streams the header through
one buffered file instead: it keeps the few scalar keys it needs and seeks over everything else.

The format, little-endian, versions 2 and 3: b"GGUF", uint32 version, uint64 tensor_count, uint64 kv_count;
kv_count pairs of a string key, a uint32 value type and a value; tensor_count tensor infos (string name,
uint32 n_dims, n_dims uint64 dims, uint32 ggml type, uint64 offset). A string is a uint64 length and that many
bytes, an array a uint32 element type, a uint64 count and the elements. The tensor data starts at the first
multiple of `general.alignment` (default 32) after the header, and each tensor's offset counts from there.

ctransformers 0.2.27 segfaults on a truncated header, crashes later on truncated weights, and its ggml trusts
the header in more ways, so `read_header` also rejects:

- counts of keys, tensors and array elements, and string lengths, that the rest of the file cannot hold;
- unknown value types, and arrays of arrays (ggml asserts `false && "invalid type"` and aborts);
- tensors with more than four dimensions (ggml copies the dimensions into an array of four);
- unknown ggml types, rows that are not whole quantization blocks, and offsets off the alignment;
- tensor data that does not lie inside the file.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
"""GGML_MAX_DIMS: ggml stores the dimensions of a tensor in an array of this many."""

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STRING = GGUFValueType.STRING.value
_ARRAY = GGUFValueType.ARRAY.value
_SCALARS = {
    t.value: struct.Struct(code)
    for t, code in [
        (GGUFValueType.UINT8, "<B"),
        (GGUFValueType.INT8, "<b"),
        (GGUFValueType.UINT16, "<H"),
        (GGUFValueType.INT16, "<h"),
        (GGUFValueType.UINT32, "<I"),
        (GGUFValueType.INT32, "<i"),
        (GGUFValueType.FLOAT32, "<f"),
        (GGUFValueType.BOOL, "<?"),
        (GGUFValueType.UINT64, "<Q"),
        (GGUFValueType.INT64, "<q"),
        (GGUFValueType.FLOAT64, "<d"),
    ]
}
_INTEGERS = frozenset(
    t.value
    for t in (
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    )
)
_QUANT_SIZES = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}
_MIN_KV_BYTES = 8 + 4 + 1  # an empty key, the value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # an empty name, n_dims = 0, the ggml type, the offset
_KEPT_STRINGS = frozenset({b"general.architecture", b"tokenizer.ggml.model", b"tokenizer.ggml.pre"})
"""The string values `read_header` keeps; every other string is skipped unread."""
_COUNT_KEYS = (
    "context_length",
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
)


@dataclass(frozen=True)
class HeaderFacts:
    """What a GGUF header says. `architecture` and the counts after it are None if the header lacks them."""

    version: int
    tensor_count: int
    kv_count: int
    alignment: int
    data_offset: int
    architecture: str | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    chat_template: str | None = None
    """`tokenizer.chat_template`: the Jinja2 template that turns chat messages into a prompt."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tokens_at: tuple[int, int] | None = None
    """(file offset of the first string, count) of `tokenizer.ggml.tokens`, for `read_token_texts`."""
    tensor_types: frozenset[int] = frozenset()
    """The ggml types of the tensors (`GGMLQuantizationType` values): which backend can compute with them."""
    tokenizer_model: str | None = None
    """`tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (byte-level BPE), ..."""
    tokenizer_pre: str | None = None
    """`tokenizer.ggml.pre`: the BPE pre-tokenizer ("llama-bpe" for Llama 3, "qwen2", ...), if the file names one."""


def read_header(path: Path) -> HeaderFacts:
    """Parse the header of the GGUF file at `path` and check that every tensor's data lies inside the file.

    Raises ValueError, with the reason, if the file is not GGUF v2 or v3, if the header is cut short or
    inconsistent, or if a tensor reaches past the end of the file. OSError (a missing file) is not caught.
    """
    with Path(path).open("rb") as f:
        return _parse(_Stream(f, os.fstat(f.fileno()).st_size))


class _Stream:
    """A buffered file whose position is counted here, so that every length can be checked against the file."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"the file ends (at {self.size} bytes) inside {what}, at byte {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise ValueError(f"{what} needs {n} bytes at byte {self.pos}, but the file ends at {self.size}")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.read(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack(self.read(8, what))[0]
        return value

    def string_length(self, what: str) -> int:
        n = self.u64(f"the length of {what}")
        if n > self.left():
            raise ValueError(f"{what} claims {n} bytes at byte {self.pos}, but the file ends at {self.size}")
        return n

    def string(self, what: str) -> bytes:
        return self.read(self.string_length(what), what)

    def skip_strings(self, count: int, what: str) -> None:
        # The hot loop of a vocabulary: local names and no f-strings until something is wrong.
        read, seek, unpack, size = self.f.read, self.f.seek, _U64.unpack, self.size
        pos = self.pos
        for i in range(count):
            raw = read(8)
            if len(raw) != 8:
                raise ValueError(f"the file ends (at {size} bytes) inside string {i} of {what}")
            (n,) = unpack(raw)
            pos += 8 + n
            if pos > size:
                raise ValueError(f"string {i} of {what} claims {n} bytes, but the file ends at {size}")
            seek(n, os.SEEK_CUR)
        self.pos = pos


def read_token_texts(path: Path, tokens_at: tuple[int, int] | None, ids: Sequence[int]) -> dict[int, str]:
    """The vocabulary's text of each token id in `ids` (ids outside the vocabulary are left out).

    Walks the token strings from their start up to the largest id asked for: milliseconds even for a 128k
    vocabulary, and only done once per load.
    """
    if tokens_at is None:
        return {}
    offset, count = tokens_at
    wanted = {i for i in ids if 0 <= i < count}
    found: dict[int, str] = {}
    with Path(path).open("rb") as f:
        f.seek(offset)
        for i in range(max(wanted, default=-1) + 1):
            (n,) = _U64.unpack(f.read(8))
            if i in wanted:
                found[i] = f.read(n).decode(errors="replace")
            else:
                f.seek(n, os.SEEK_CUR)
    return found


def _parse(s: _Stream) -> HeaderFacts:
    magic = s.read(4, "the magic number")
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    version = s.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (only {' and '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = s.u64("the tensor count")
    kv_count = s.u64("the key count")
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > s.left():
        raise ValueError(
            f"the header claims {kv_count} keys and {tensor_count} tensors, more than the file "
            f"({s.size} bytes) can hold"
        )

    types: dict[bytes, int] = {}
    values: dict[bytes, object] = {}
    for i in range(kv_count):
        key = s.string(f"key {i}")
        if key in types:
            raise ValueError(f"key {_show(key)} appears twice")
        vtype = s.u32(f"the value type of {_show(key)}")
        types[key] = vtype
        values[key] = _read_value(s, key, vtype)

    alignment = DEFAULT_ALIGNMENT
    if b"general.alignment" in types:
        if types[b"general.alignment"] != GGUFValueType.UINT32:
            raise ValueError(f"general.alignment is a {_type_name(types[b'general.alignment'])}, not a uint32")
        alignment = _int(values[b"general.alignment"])
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment}, not a power of two")

    tensors = [_read_tensor_info(s, i) for i in range(tensor_count)]
    names: set[bytes] = set()
    data_offset = -(-s.pos // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        if name in names:
            raise ValueError(f"tensor {_show(name)} appears twice")
        names.add(name)
        block_size, type_size = _QUANT_SIZES[ggml_type]
        if dims and dims[0] % block_size:
            raise ValueError(
                f"tensor {_show(name)} has rows of {dims[0]} values, not whole blocks of {block_size} "
                f"for {GGMLQuantizationType(ggml_type).name}"
            )
        if offset % alignment:
            raise ValueError(f"tensor {_show(name)} starts at offset {offset}, not a multiple of {alignment}")
        start = data_offset + offset
        end = start + math.prod(dims) // block_size * type_size
        if end > s.size:
            raise ValueError(
                f"tensor {_show(name)} needs bytes {start} to {end}, but the file ends at {s.size}: "
                "it is truncated or damaged"
            )

    strings: dict[bytes, str | None] = dict.fromkeys(_KEPT_STRINGS)
    for key in _KEPT_STRINGS & types.keys():
        if types[key] != _STRING:
            raise ValueError(f"{_show(key)} is a {_type_name(types[key])}, not a string")
        strings[key] = str(values[key])
    architecture = strings[b"general.architecture"]
    counts: dict[str, int | None] = dict.fromkeys(_COUNT_KEYS)
    if architecture is not None:
        for count_key in _COUNT_KEYS:
            key = f"{architecture}.{count_key}".encode()
            if key in types:
                if types[key] not in _INTEGERS:
                    raise ValueError(f"{_show(key)} is a {_type_name(types[key])}, not an integer")
                counts[count_key] = _int(values[key])
    return HeaderFacts(
        version=version,
        tensor_count=tensor_count,
        kv_count=kv_count,
        alignment=alignment,
        data_offset=data_offset,
        architecture=architecture,
        context_length=counts["context_length"],
        block_count=counts["block_count"],
        embedding_length=counts["embedding_length"],
        head_count=counts["attention.head_count"],
        head_count_kv=counts["attention.head_count_kv"],
        chat_template=_text_or_none(values.get(b"tokenizer.chat_template")),
        bos_token_id=_int_or_none(types, values, b"tokenizer.ggml.bos_token_id"),
        eos_token_id=_int_or_none(types, values, b"tokenizer.ggml.eos_token_id"),
        tokens_at=_tokens_at(values.get(b"tokenizer.ggml.tokens")),
        tensor_types=frozenset(ggml_type for _, _, ggml_type, _ in tensors),
        tokenizer_model=strings[b"tokenizer.ggml.model"],
        tokenizer_pre=strings[b"tokenizer.ggml.pre"],
    )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(types: dict[bytes, int], values: dict[bytes, object], key: bytes) -> int | None:
    value = values.get(key)
    return value if types.get(key) in _INTEGERS and isinstance(value, int) else None


def _tokens_at(value: object) -> tuple[int, int] | None:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    return None


def _read_value(s: _Stream, key: bytes, vtype: int) -> object:
    """Read a scalar value or a string of `_KEPT_STRINGS` or `tokenizer.chat_template`; skip any other string
    or array and return None, except the vocabulary, whose (offset, count) is returned."""
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        return scalar.unpack(s.read(scalar.size, f"the value of {_show(key)}"))[0]
    if vtype == _STRING:
        if key in _KEPT_STRINGS:
            raw = s.string(_show(key))
            try:
                return raw.decode()
            except UnicodeDecodeError as exc:
                raise ValueError(f"{key.decode()} is not UTF-8: {raw[:40]!r}") from exc
        if key == b"tokenizer.chat_template":
            return s.string("tokenizer.chat_template").decode(errors="replace")
        s.skip(s.string_length(f"the value of {_show(key)}"), f"the value of {_show(key)}")
        return None
    if vtype == _ARRAY:
        what = f"the array {_show(key)}"
        elem_type = s.u32(f"the element type of {what}")
        count = s.u64(f"the length of {what}")
        if elem_type == _STRING:
            if count * 8 > s.left():
                raise ValueError(f"{what} claims {count} strings, more than the rest of the file can hold")
            start = s.pos
            s.skip_strings(count, what)
            if key == b"tokenizer.ggml.tokens":
                return (start, count)
        elif elem_type in _SCALARS:
            s.skip(count * _SCALARS[elem_type].size, what)
        elif elem_type == _ARRAY:
            raise ValueError(f"{what} holds arrays, which ggml cannot read")
        else:
            raise ValueError(f"{what} holds values of unknown type {elem_type}")
        return None
    raise ValueError(f"{_show(key)} has unknown value type {vtype}")


def _read_tensor_info(s: _Stream, i: int) -> tuple[bytes, tuple[int, ...], int, int]:
    # Messages name the tensor by its index until its name is known to be worth decoding: a model has thousands.
    name = s.string(f"the name of tensor {i}")
    n_dims = s.u32(f"the dimension count of tensor {i}")
    if n_dims > MAX_DIMS:
        raise ValueError(f"tensor {_show(name)} has {n_dims} dimensions, more than ggml's {MAX_DIMS}")
    dims: tuple[int, ...] = struct.unpack(f"<{n_dims}Q", s.read(8 * n_dims, f"the dimensions of tensor {i}"))
    ggml_type = s.u32(f"the type of tensor {i}")
    if ggml_type not in _QUANT_SIZES:
        raise ValueError(f"tensor {_show(name)} has unknown ggml type {ggml_type}")
    offset = s.u64(f"the offset of tensor {i}")
    return name, dims, ggml_type, offset


def _int(value: object) -> int:
    assert isinstance(value, int)  # the value types were checked before
    return value


def _show(name: bytes) -> str:
    return repr(name.decode(errors="replace")) if len(name) <= 80 else repr(name[:80].decode(errors="replace") + "...")


def _type_name(vtype: int) -> str:
    try:
        return GGUFValueType(vtype).name.lower()
    except ValueError:
        return f"value of type {vtype}"
