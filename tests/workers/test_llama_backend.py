"""The real llama.cpp backend against real GGUF files: generated qwen2 and Llama-3-style models, stories260K."""

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from broker.errors import ModelLoadFailed, ModelNotLoaded
from workers.backend import CTransformersLoader
from workers.backends import Backends
from workers.gguf_factory import (
    write_headless_llama,
    write_tiny_llama,
    write_tiny_llama3,
    write_tiny_qwen2,
    write_unknown_architecture,
)
from workers.gguf_info import kv_cache_bytes, read_gguf_info
from workers.inference.backend import SamplingParams
from workers.llama_backend import DEFAULT_CONTEXT, LlamaCppBackend, LlamaCppModel

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'modelfleet[llama-cpp]'")

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K.gguf"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    return LlamaCppBackend(threads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    return {
        "qwen2": write_tiny_qwen2(root / "qwen2.gguf"),
        "llama3": write_tiny_llama3(root / "llama3.gguf"),
        "llama": write_tiny_llama(root / "llama.gguf"),
        "bf16": write_tiny_llama(root / "bf16.gguf", weight_type=GGMLQuantizationType.BF16),
    }


@pytest.fixture
def qwen2(backend: LlamaCppBackend, files: dict[str, Path]) -> Iterator[LlamaCppModel]:
    model = backend.load(files["qwen2"], context_length=None, gpu_layers=None)
    yield model
    backend.unload(model)


def generate(model: LlamaCppModel, prompt: str, n: int, cancelled: Callable[[], bool] = lambda: False) -> list[int]:
    out: list[int] = []
    tokens = model.generate(model.tokenize(prompt, add_bos=True), GREEDY, cancelled)
    for token in tokens:
        out.append(token)
        if len(out) == n:
            break
    tokens.close()
    return out


def test_auto_sends_what_ctransformers_cannot_run_to_llama(backend: LlamaCppBackend, files: dict[str, Path]) -> None:
    both = Backends([CTransformersLoader(threads=1), backend])
    assert both.plan(files["llama"], None).backend == "ctransformers"
    for name in ("qwen2", "llama3", "bf16"):
        model = both.load(files[name], context_length=None, gpu_layers=None)
        assert model.backend == "llama-cpp" and both.check(model)
        assert len(generate(model, "Once upon a time", 3)) == 3
        both.unload(model)
    assert both.plan(files["llama"], None, "llama-cpp").backend == "llama-cpp"


def test_qwen2_loads_with_its_template_and_special_tokens(qwen2: LlamaCppModel, backend: LlamaCppBackend) -> None:
    assert qwen2.context_length == DEFAULT_CONTEXT and qwen2.gpu_layers == 0
    assert qwen2.chat_template is not None and "<|im_start|>" in qwen2.chat_template
    assert qwen2.eos_token == "<|im_end|>"
    ids = qwen2.tokenize("<|im_start|>user\nHello world<|im_end|>", add_bos=False)
    assert ids[0] == qwen2.tokenize("<|im_start|>", add_bos=False)[0] and len(ids) < 20
    assert qwen2.detokenize(qwen2.tokenize("Once upon a time", add_bos=False)) == b"Once upon a time"
    assert backend.check(qwen2)


def test_llama3_vocabulary_round_trips(backend: LlamaCppBackend, files: dict[str, Path]) -> None:
    model = backend.load(files["llama3"], context_length=256, gpu_layers=-1)
    try:
        assert model.context_length == 256 and model.gpu_layers == 3
        assert model.bos_token == "<|begin_of_text|>" and model.eos_token == "<|eot_id|>"
        ids = model.tokenize("Hello world, émoji 🙂", add_bos=True)
        assert ids[0] == model.tokenize("", add_bos=True)[0]
        assert model.detokenize(ids[1:]).decode() == "Hello world, émoji 🙂"
    finally:
        backend.unload(model)


@pytest.mark.parametrize(("gpu_layers", "reported"), [(None, 0), (1, 1), (-1, 3)])
def test_gpu_layers_is_llama_cpps_n_gpu_layers(
    backend: LlamaCppBackend, files: dict[str, Path], gpu_layers: int | None, reported: int
) -> None:
    """`gpuLayers` reaches llama.cpp as `n_gpu_layers` (-1: every layer, which llama-cpp-python passes as its
    largest int); the listing reports the layers, the output layer counted, as on ctransformers."""
    model = backend.load(files["qwen2"], context_length=None, gpu_layers=gpu_layers)
    try:
        assert model.gpu_layers == reported
        assert model.handle.model_params.n_gpu_layers == (2**31 - 1 if gpu_layers == -1 else reported)
    finally:
        backend.unload(model)


def test_greedy_generation_is_repeatable_and_reuses_the_cache(qwen2: LlamaCppModel) -> None:
    first = generate(qwen2, "Once upon a time", 8)
    assert len(first) == 8
    # Stopped after 8 tokens (as max_tokens and stop strings stop it): the prompt and the 7 tokens fed back stay
    # evaluated, for the next prompt that starts the same way.
    assert qwen2.handle.n_tokens == len(qwen2.tokenize("Once upon a time", add_bos=True)) + 7
    assert generate(qwen2, "Once upon a time", 8) == first
    assert generate(qwen2, "Hello", 4) == generate(qwen2, "Hello", 4)
    assert generate(qwen2, "Once upon a time", 8) == first  # after a different prompt: the cache was cut back


def test_cancelling_stops_before_the_prompt_is_evaluated(qwen2: LlamaCppModel) -> None:
    assert generate(qwen2, "Once upon a time " * 20, 5, cancelled=lambda: True) == []
    assert len(generate(qwen2, "Once upon a time", 3)) == 3  # and the model still answers


def test_stories260k_continues_as_on_ctransformers(backend: LlamaCppBackend) -> None:
    if not STORIES.is_file():
        pytest.skip(f"the shared model {STORIES} is absent")
    model = backend.load(STORIES, context_length=None, gpu_layers=None)
    try:
        text = b"".join(model.detokenize([t]) for t in generate(model, "Once upon a time", 10)).decode()
        assert text.startswith(", there was a little girl named Lily")
    finally:
        backend.unload(model)


def test_any_seed_repeats_and_far_apart_seeds_differ(backend: LlamaCppBackend) -> None:
    """llama.cpp keeps 32 bits of a seed and reads 0xFFFFFFFF as "random": -1 and 2**32 - 1 did not repeat, and
    5 and 2**64 + 5 sampled the same."""
    if not STORIES.is_file():
        pytest.skip(f"the shared model {STORIES} is absent")
    model = backend.load(STORIES, context_length=None, gpu_layers=None)

    def sampled(seed: int) -> list[int]:
        tokens = model.generate(model.tokenize("Once upon a time", add_bos=True), SamplingParams(1.5, 1.0, seed), no)
        out = [t for _, t in zip(range(24), tokens, strict=False)]
        tokens.close()
        return out

    try:
        for seed in (-1, 2**32 - 1, 2**63, 0):
            assert sampled(seed) == sampled(seed), seed
        assert sampled(5) != sampled(2**64 + 5)
    finally:
        backend.unload(model)


def no() -> bool:
    return False


def test_a_file_llama_cpp_refuses_fails_with_its_reason(backend: LlamaCppBackend, tmp_path: Path) -> None:
    headless = write_headless_llama(tmp_path / "headless.gguf")
    with pytest.raises(ModelLoadFailed, match=r"could not load headless\.gguf as a 'llama' model: .+") as excinfo:
        backend.load(headless, context_length=None, gpu_layers=None)
    assert "gave no reason" not in excinfo.value.message
    alien = write_unknown_architecture(tmp_path / "alien.gguf")
    assert backend.problem(read_gguf_info(alien)) == "architecture nosucharch"


def test_check_makes_the_model_answer(backend: LlamaCppBackend, files: dict[str, Path]) -> None:
    """`healthy` means the model answered: the check runs the model (a tokenizer alone would pass with broken
    weights or a failing GPU), as on ctransformers."""
    model = backend.load(files["qwen2"], context_length=None, gpu_layers=None)
    try:
        assert model.handle.n_tokens == 0
        assert backend.check(model)
        assert model.handle.n_tokens > 0  # llama.cpp evaluated the prompt to sample a token
        assert len(generate(model, "Once upon a time", 3)) == 3  # and the model still serves
    finally:
        backend.unload(model)


def test_the_health_check_keeps_the_cache_for_the_next_turn(qwen2: LlamaCppModel, backend: LlamaCppBackend) -> None:
    """Asked with what the cache holds, the check evaluates one token and leaves the cache as it was (a check from
    a letter would cut it back to two tokens, and the next turn of a chat would start from scratch)."""
    generate(qwen2, "Once upon a time", 8)
    before = qwen2.cached()
    assert len(before) == len(qwen2.tokenize("Once upon a time", add_bos=True)) + 7
    assert backend.check(qwen2)
    assert qwen2.cached() == before


def test_unload_frees_the_model(backend: LlamaCppBackend, files: dict[str, Path]) -> None:
    model = backend.load(files["qwen2"], context_length=None, gpu_layers=None)
    backend.unload(model)
    assert model.handle is None and not backend.check(model)
    with pytest.raises(ModelNotLoaded):
        model.tokenize("a", add_bos=False)


MEASURE = """
import gc, json, sys
import psutil
from workers.inference.backend import SamplingParams
from workers.llama_backend import LlamaCppBackend

backend = LlamaCppBackend(threads=2)
backend.unload(backend.load(sys.argv[2], context_length=None, gpu_layers=None))  # llama.cpp's one-time set-up
gc.collect()
before = psutil.Process().memory_info().rss
model = backend.load(sys.argv[1], context_length=512, gpu_layers=None)
loaded = psutil.Process().memory_info().rss - before
tokens = model.generate(model.tokenize("Once upon a time, " * 25, add_bos=True), SamplingParams(0.0), lambda: False)
next(tokens)
tokens.close()
print(json.dumps({"loaded": loaded, "used": psutil.Process().memory_info().rss - before}))
"""


def test_estimate_covers_what_a_model_takes_in_use(backend: LlamaCppBackend, tmp_path: Path) -> None:
    """The weights are resident once loaded; cache and compute buffer as prompts fill the context. Measured in a
    fresh process (in this one, memory freed by earlier tests is reused) after a first load of another model has
    done llama.cpp's one-time set-up (about 5 MB): it grows by at least the weights once loaded and, after a prompt
    of about 350 tokens (most of the cache, a big batch), by no more than the estimate."""
    path = write_tiny_llama(tmp_path / "big.gguf", n_embd=128, n_layer=4, n_head=4, pad_to_bytes=4_000_000)
    info = read_gguf_info(path)
    estimate = backend.estimate_bytes(info, 512)
    assert estimate > info.file_size + kv_cache_bytes(info, 512, bytes_per_value=2)  # plus the compute buffer
    warm_up = write_tiny_llama(tmp_path / "warm-up.gguf")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(warm_up)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grew = json.loads(done.stdout.strip().splitlines()[-1])
    assert grew["loaded"] >= info.file_size * 0.95, grew
    assert info.file_size < grew["used"] <= estimate, (grew, estimate)
