"""The streaming GGUF header reader against gguf.GGUFReader, and against files cut short or damaged on purpose."""

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from workers.backend import InvalidModelFile, read_gguf_info
from workers.gguf_factory import write_tiny_llama, write_tiny_llama3, write_tiny_qwen2
from workers.gguf_header import HeaderFacts, read_header

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K.gguf"
MB = 1_000_000


def facts_from_gguf_reader(path: Path) -> HeaderFacts:
    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    architecture = value("general.architecture")
    assert architecture is None or isinstance(architecture, str)
    return HeaderFacts(
        version=value("GGUF.version"),
        tensor_count=value("GGUF.tensor_count"),
        kv_count=value("GGUF.kv_count"),
        alignment=int(reader.alignment),
        data_offset=int(reader.data_offset),
        architecture=architecture,
        context_length=value(f"{architecture}.context_length"),
        block_count=value(f"{architecture}.block_count"),
        embedding_length=value(f"{architecture}.embedding_length"),
        head_count=value(f"{architecture}.attention.head_count"),
        head_count_kv=value(f"{architecture}.attention.head_count_kv"),
        chat_template=value("tokenizer.chat_template"),
        bos_token_id=value("tokenizer.ggml.bos_token_id"),
        eos_token_id=value("tokenizer.ggml.eos_token_id"),
        tokens_at=tokens_at(reader),
        tensor_types=frozenset(int(t.tensor_type) for t in reader.tensors),
        tokenizer_model=value("tokenizer.ggml.model"),
        tokenizer_pre=value("tokenizer.ggml.pre"),
    )


def tokens_at(reader: gguf.GGUFReader) -> tuple[int, int] | None:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        return None
    # parts: key length, key, value type, element type, count, then (length, bytes) per token
    return int(field.offset) + sum(p.nbytes for p in field.parts[:5]), len(field.data)


def data_end(path: Path) -> int:
    """Where the last byte of tensor data ends, by GGUFReader (padding may follow it)."""
    return max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def field_offset(path: Path, key: str) -> int:
    field = gguf.GGUFReader(path).get_field(key)
    assert field is not None
    return int(field.offset)


def patch(path: Path, at: int, raw: bytes) -> Path:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(raw)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("header") / "tiny.gguf", n_head_kv=2)


@pytest.fixture(scope="module")
def vocab32k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("header") / "vocab32k.gguf", n_vocab=32000)


@pytest.fixture
def copy_of_tiny(tiny: Path, tmp_path: Path) -> Path:
    path = tmp_path / "copy.gguf"
    path.write_bytes(tiny.read_bytes())
    return path


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"n_embd": 64, "n_layer": 3, "n_head": 8, "n_head_kv": 2, "context_length": 2048},
        {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_head_kv": 1, "n_vocab": 600, "context_length": 64},
        {"n_head_kv": 2, "pad_to_bytes": 2 * MB},
    ],
    ids=["default", "gqa", "one-layer", "padded"],
)
def test_agrees_with_gguf_reader_on_generated_llamas(tmp_path: Path, shape: dict[str, Any]) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", **shape)
    facts = read_header(path)
    assert facts == facts_from_gguf_reader(path)
    assert facts.architecture == "llama"
    assert facts.block_count == shape.get("n_layer", 2)
    assert facts.head_count_kv == shape.get("n_head_kv", 4)


@pytest.mark.parametrize("write", [write_tiny_qwen2, write_tiny_llama3], ids=["qwen2", "llama3"])
def test_agrees_with_gguf_reader_on_bpe_vocabularies(tmp_path: Path, write: Any) -> None:
    path = write(tmp_path / "m.gguf")
    facts = read_header(path)
    assert facts == facts_from_gguf_reader(path)
    assert facts.tokenizer_model == "gpt2" and facts.tokenizer_pre in {"qwen2", "llama-bpe"}


def test_agrees_with_gguf_reader_on_a_32k_vocabulary(vocab32k: Path) -> None:
    tokens = gguf.GGUFReader(vocab32k).get_field("tokenizer.ggml.tokens")
    assert tokens is not None
    assert len(tokens.data) == 32000
    assert read_header(vocab32k) == facts_from_gguf_reader(vocab32k)


def test_agrees_with_gguf_reader_on_stories260k() -> None:
    if not STORIES.is_file():
        pytest.skip(f"the shared model {STORIES} is absent (see ../shared/models/README.md)")
    facts = read_header(STORIES)
    assert facts == facts_from_gguf_reader(STORIES)
    assert (facts.architecture, facts.context_length, facts.block_count) == ("llama", 2048, 5)


def test_counts_an_architecture_lacks_are_none_and_custom_alignment_is_used(tmp_path: Path) -> None:
    path = tmp_path / "snake.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_custom_alignment(64)
    writer.add_block_count(1)
    writer.add_array("some.floats", [0.5] * 100)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((3, 5), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    facts = read_header(path)
    assert facts == facts_from_gguf_reader(path)
    assert facts.alignment == 64
    assert facts.data_offset % 64 == 0
    assert (facts.architecture, facts.block_count, facts.context_length) == ("mamba", 1, None)


def test_every_cut_through_the_header_and_the_data_is_rejected(tiny: Path, tmp_path: Path) -> None:
    whole = tiny.read_bytes()
    facts = read_header(tiny)
    end = data_end(tiny)
    cuts = [*range(0, facts.data_offset, 7), facts.data_offset, *range(facts.data_offset + 1, end, 997), end - 1]
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError):  # the reason differs with the cut
            read_header(path)
    # Only the padding after the last tensor may go.
    path.write_bytes(whole[:end])
    assert read_header(path) == facts


def test_tensor_offset_past_the_end_is_rejected(copy_of_tiny: Path) -> None:
    reader = gguf.GGUFReader(copy_of_tiny)
    last = reader.tensors[-1].field
    offset_at = int(last.offset) + sum(int(part.nbytes) for part in last.parts) - 8
    size = copy_of_tiny.stat().st_size
    patch(copy_of_tiny, offset_at, struct.pack("<Q", size // 32 * 32))
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up\.weight' needs bytes .* the file ends at"):
        read_header(copy_of_tiny)
    with pytest.raises(InvalidModelFile, match=r"copy\.gguf is damaged"):
        read_gguf_info(copy_of_tiny)


def test_unaligned_tensor_offset_is_rejected(copy_of_tiny: Path) -> None:
    first = gguf.GGUFReader(copy_of_tiny).tensors[0].field
    offset_at = int(first.offset) + sum(int(part.nbytes) for part in first.parts) - 8
    patch(copy_of_tiny, offset_at, struct.pack("<Q", 4))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        read_header(copy_of_tiny)


def test_more_than_four_dimensions_are_rejected(copy_of_tiny: Path) -> None:
    first = gguf.GGUFReader(copy_of_tiny).tensors[0].field
    n_dims_at = int(first.offset) + 8 + len("token_embd.weight")
    patch(copy_of_tiny, n_dims_at, struct.pack("<I", 5))
    with pytest.raises(ValueError, match="5 dimensions"):
        read_header(copy_of_tiny)


@pytest.mark.parametrize(
    ("at", "raw", "reason"),
    [
        (8, struct.pack("<Q", 2**60), "more than the file"),  # tensor_count
        (16, struct.pack("<Q", 2**40), "more than the file"),  # kv_count
        (24, struct.pack("<Q", 2**50), "claims 1125899906842624 bytes"),  # the first key's length
        (4, struct.pack("<I", 1), "version 1 is not supported"),
    ],
    ids=["tensor-count", "kv-count", "key-length", "version"],
)
def test_absurd_counts_are_rejected(copy_of_tiny: Path, at: int, raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        read_header(patch(copy_of_tiny, at, raw))


def test_absurd_array_length_and_string_length_are_rejected(copy_of_tiny: Path) -> None:
    key = "tokenizer.ggml.tokens"
    count_at = field_offset(copy_of_tiny, key) + 8 + len(key) + 4 + 4
    patch(copy_of_tiny, count_at, struct.pack("<Q", 2**40))
    with pytest.raises(ValueError, match="claims 1099511627776 strings"):
        read_header(copy_of_tiny)
    patch(copy_of_tiny, count_at, struct.pack("<QQ", 512, 2**33))  # the right count, then a huge first string
    with pytest.raises(ValueError, match=r"string 0 of the array 'tokenizer\.ggml\.tokens' claims 8589934592 bytes"):
        read_header(copy_of_tiny)


@pytest.mark.parametrize(("elem_type", "reason"), [(9, "holds arrays"), (13, "unknown type 13")])
def test_arrays_ggml_cannot_read_are_rejected(copy_of_tiny: Path, elem_type: int, reason: str) -> None:
    key = "tokenizer.ggml.tokens"
    patch(copy_of_tiny, field_offset(copy_of_tiny, key) + 8 + len(key) + 4, struct.pack("<I", elem_type))
    with pytest.raises(ValueError, match=reason):
        read_header(copy_of_tiny)


def test_a_count_of_the_wrong_type_is_rejected(copy_of_tiny: Path) -> None:
    key = "llama.block_count"
    assert gguf.GGUFReader(copy_of_tiny).fields[key].types == [gguf.GGUFValueType.UINT32]
    patch(copy_of_tiny, field_offset(copy_of_tiny, key) + 8 + len(key), struct.pack("<I", 6))  # float32
    with pytest.raises(ValueError, match=r"'llama\.block_count' is a float32, not an integer"):
        read_header(copy_of_tiny)


def test_not_gguf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"just text " * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_header(path)


def test_quantized_tensors_are_sized_by_blocks(tmp_path: Path) -> None:
    path = tmp_path / "quantized.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    weights = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    for qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        quantized = gguf.quantize(weights, qtype)
        writer.add_tensor(f"w.{qtype.name}", quantized, raw_shape=quantized.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_header(path) == facts_from_gguf_reader(path)
    end = data_end(path)
    assert end == path.stat().st_size  # Q8_0 last: 8 rows of 2 blocks of 34 bytes, no padding after
    with path.open("r+b") as f:
        f.truncate(end - 1)
    with pytest.raises(ValueError, match=r"tensor 'w\.Q8_0' needs bytes"):
        read_header(path)
