"""Small llama GGUF files with random weights that ctransformers 0.2.27 loads and runs.

Tests and benchmarks use them to get real model files of a chosen shape and size without downloading anything.
The weights are random, so the text they generate is noise.

ctransformers 0.2.27 tokenizes a prompt into a buffer of `len(prompt) + 1` ints, and llama.cpp writes past the
end of that buffer when the prompt needs more tokens. The heap is then corrupted and the process segfaults later,
often while it collects garbage. llama.cpp's SentencePiece tokenizer adds a leading "▁" and turns every space
into "▁". If the vocabulary had only byte tokens, each of those would cost three byte tokens. So the vocabulary
written here also has "▁", every printable ASCII character and "▁" followed by each of them. With those tokens,
an ASCII prompt never needs more than `len(prompt) + 1` tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np

_SPECIAL = ["<unk>", "<s>", "</s>"]
_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_PRINTABLE = [chr(c) for c in range(33, 127)]
_PIECES = ["\u2581", *_PRINTABLE, *("\u2581" + c for c in _PRINTABLE)]

MIN_VOCAB = len(_SPECIAL) + len(_BYTES) + len(_PIECES)
"""The smallest `n_vocab` that keeps ASCII prompts inside ctransformers' token buffer (448)."""

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


def write_tiny_llama(
    path: Path,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_vocab: int = 512,
    context_length: int = 128,
    pad_to_bytes: int | None = None,
    seed: int = 0,
    description: str = "modelfleet demo: random weights, not a trained model",
    endless: bool = False,
) -> Path:
    """Write a llama model with random F32 weights to `path` and return `path`.

    The file has a SentencePiece ("llama") tokenizer: `<unk>`, `<s>` (BOS), `</s>` (EOS), the 256 byte tokens,
    and the pieces that keep ASCII prompts safe (see the module docstring), and then filler tokens up to
    `n_vocab`. `n_vocab` must be at least `MIN_VOCAB`.

    `endless` zeroes the output row of EOS, so greedy decoding never ends the text by itself (random logits
    around zero always have a larger one): for tests that need a generation as long as they ask.

    `pad_to_bytes` makes the file at least that many bytes long by widening the feed-forward layers
    (`llama.feed_forward_length`). llama.cpp refuses files with tensors it does not expect, so extra tensors
    are not an option. A bigger vocabulary would slow down every header read, because the reader parses each
    token string.
    """
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be at least {MIN_VOCAB}, got {n_vocab}")
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("n_embd must split into n_head heads of even size, and n_head into n_head_kv groups")
    path = Path(path)
    write = functools.partial(
        _write,
        path,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        context_length=context_length,
        seed=seed,
        description=description,
        endless=endless,
    )
    n_ff = 2 * n_embd
    write(n_ff=n_ff)
    size = path.stat().st_size
    # Each feed-forward unit adds three F32 rows of n_embd per layer. One extra unit makes up for the
    # 32-byte alignment padding, which can shrink when the tensors grow.
    per_unit = 3 * n_layer * n_embd * 4
    while pad_to_bytes is not None and size < pad_to_bytes:
        n_ff += -(-(pad_to_bytes - size) // per_unit) + 1
        write(n_ff=n_ff)
        size = path.stat().st_size
    return path


def _write(
    path: Path,
    *,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    n_ff: int,
    context_length: int,
    seed: int,
    description: str,
    endless: bool,
) -> None:
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= 0.02
        return w

    tokens = [*_SPECIAL, *_BYTES, *_PIECES]
    tokens += [f"\u2581tok{i}" for i in range(n_vocab - len(tokens))]
    n_fixed = len(_SPECIAL) + len(_BYTES)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * len(_BYTES) + [gguf.TokenType.NORMAL] * (n_vocab - n_fixed)
    scores = [0.0] * n_fixed + [-float(i) for i in range(n_vocab - n_fixed)]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-llama-e{n_embd}-l{n_layer}-ff{n_ff}")
    writer.add_description(description)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)

    n_embd_kv = n_embd * n_head_kv // n_head
    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones)
    output = weights(n_vocab, n_embd)
    if endless:
        output[EOS_ID] = 0.0
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_not_gguf(path: Path) -> Path:
    """Write a file that has a model's name but is not GGUF (it is text), and return `path`."""
    path = Path(path)
    path.write_bytes(b"this is not a GGUF model file, only text with a .gguf name\n" * 64)
    return path


def write_truncated_gguf(path: Path, *, keep_bytes: int = 64) -> Path:
    """Write a tiny llama cut off after `keep_bytes` bytes and return `path`.

    The default keeps the magic, version and counts and cuts into the first key, so no header reader can
    parse it. A bigger `keep_bytes` (up to the header size) cuts elsewhere in the header or in the weights.
    """
    path = Path(path)
    write_tiny_llama(path)
    with path.open("r+b") as f:
        f.truncate(keep_bytes)
    return path


def write_headless_llama(path: Path) -> Path:
    """Write a well-formed GGUF llama header with only the token embedding (no layers), and return `path`.

    Every header check passes; ctransformers then refuses it cleanly (no crash), which is how a load gets as far
    as the backend and fails there, with a `model-load-failed` event.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((512, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_with_chat_template(source: Path, path: Path, template: str) -> Path:
    """Copy the GGUF model at `source` to `path` with `tokenizer.chat_template` set to `template`.

    Weights and every other key are copied as they are, so a real model keeps answering as before.
    """
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None, f"{source} has no general.architecture"
    writer = gguf.GGUFWriter(path, arch=str(arch.contents()), endianess=reader.endianess)
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])
    return Path(path)
