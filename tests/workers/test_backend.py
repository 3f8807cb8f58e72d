"""The real ctransformers backend against real GGUF files: generated tiny llamas and the shared stories260K."""

import gc
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest

from broker.errors import InvalidRequest
from workers.backend import (
    CTRANSFORMERS_DEFAULT_CONTEXT,
    CTransformersLoader,
    GGUFInfo,
    InvalidModelFile,
    LoadedModel,
    choose_lib,
    estimate_kv_cache_bytes,
    estimate_memory_bytes,
    read_gguf_info,
    safe_tokenize,
)
from workers.gguf_factory import write_not_gguf, write_tiny_llama, write_truncated_gguf
from workers.gguf_header import read_token_texts
from workers.inference.backend import SamplingParams

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K.gguf"
MB = 1_000_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", n_head_kv=2)


@pytest.fixture(scope="module")
def loader() -> CTransformersLoader:
    return CTransformersLoader(threads=2)


@pytest.fixture
def stories() -> Path:
    if not STORIES.is_file():
        pytest.skip(f"the shared model {STORIES} is absent (see ../shared/models/README.md)")
    return STORIES


@pytest.fixture
def loaded(loader: CTransformersLoader, tiny: Path) -> Iterator[LoadedModel]:
    model = loader.load(tiny, context_length=None, gpu_layers=None)
    yield model
    loader.unload(model)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_choose_lib_names_a_build_once_per_process() -> None:
    lib = choose_lib()
    assert lib in {"avx2", "avx", "basic"} or Path(lib).is_file()
    assert choose_lib() is lib


def test_header_of_a_generated_llama(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    assert info == GGUFInfo(
        architecture="llama",
        context_length=128,
        block_count=2,
        embedding_length=32,
        head_count=4,
        head_count_kv=2,
        file_size=tiny.stat().st_size,
        bos_token_id=1,
        eos_token_id=2,
        tokens_at=info.tokens_at,
        tensor_types=frozenset({0}),  # F32
        tokenizer_model="llama",
    )
    assert read_token_texts(tiny, info.tokens_at, [2, 1, 10_000]) == {1: "<s>", 2: "</s>"}
    reader = gguf.GGUFReader(tiny)
    description = reader.get_field("general.description")
    assert description is not None
    assert "random weights" in description.contents()
    assert reader.get_field("general.name") is not None


def test_generated_llama_loads_and_generates(loaded: LoadedModel, loader: CTransformersLoader, tiny: Path) -> None:
    assert loaded.architecture == "llama"
    assert loaded.size_bytes == tiny.stat().st_size
    assert loaded.context_length == CTRANSFORMERS_DEFAULT_CONTEXT  # not the header's 128
    assert loaded.gpu_layers == 0
    assert loader.check(loaded)
    assert loaded.handle is not None
    assert isinstance(loaded.handle("hello world, this is a prompt", max_new_tokens=5), str)


def test_generated_vocab_keeps_ascii_prompts_inside_the_ctransformers_buffer(loaded: LoadedModel) -> None:
    assert loaded.handle is not None
    for prompt in ["a", "hello world", "  two  spaces  ", "Tabs\tand\nnewlines!", "x" * 200, "~!@#$%^&*() {}"]:
        assert len(safe_tokenize(loaded.handle, prompt)) <= len(prompt) + 1, prompt


def test_context_length_and_gpu_layers_pass_through(loader: CTransformersLoader, tiny: Path) -> None:
    model = loader.load(tiny, context_length=64, gpu_layers=-1)
    assert model.context_length == 64
    assert model.handle is not None
    assert model.handle.context_length == 64
    assert model.gpu_layers == model.handle.config.gpu_layers == 2 + 1  # every block plus the output layer
    loader.unload(model)
    model = loader.load(tiny, context_length=None, gpu_layers=1)
    assert model.gpu_layers == 1
    loader.unload(model)


def test_unload_drops_the_handle(loader: CTransformersLoader, tiny: Path) -> None:
    model = loader.load(tiny, context_length=None, gpu_layers=None)
    loader.unload(model)
    assert model.handle is None
    assert not loader.check(model)


@pytest.mark.parametrize(("context", "healthy"), [(1, False), (2, False), (3, True)])
def test_a_context_too_small_for_any_prompt_is_not_healthy(
    loader: CTransformersLoader, stories: Path, context: int, healthy: bool
) -> None:
    """BOS, one letter and one token to answer with: the least a prompt needs. With less, the check says the model
    does not answer, without evaluating past its context (which ctransformers would do, warning on stderr)."""
    model = loader.load(stories, context_length=context, gpu_layers=None)
    try:
        assert model.context_length == context
        assert loader.check(model) is healthy
        assert len(model.cached()) <= context
    finally:
        loader.unload(model)


def test_stories260k_tells_a_story(loader: CTransformersLoader, stories: Path) -> None:
    model = loader.load(stories, context_length=None, gpu_layers=None)
    assert model.handle is not None
    assert model.architecture == "llama"
    assert model.context_length == 512  # ctransformers' default, although the header says 2048
    assert "Lily" in model.handle("Once upon a time", max_new_tokens=30, temperature=0.0)
    loader.unload(model)


def test_a_generation_stopped_early_keeps_what_it_evaluated(loader: CTransformersLoader, stories: Path) -> None:
    """Stopping a generation (max_tokens, a stop string) closes it: the prompt and the tokens fed back stay in the
    cache for the next prompt that starts the same way, and the next answer is the same."""
    model = loader.load(stories, context_length=None, gpu_layers=None)
    try:
        assert model.handle is not None
        ids = model.tokenize("Once upon a time", add_bos=True)
        runs = []
        for _ in range(2):
            tokens = model.generate(ids, SamplingParams(temperature=0.0), lambda: False)
            runs.append([next(tokens) for _ in range(8)])
            tokens.close()
            assert len(model.handle._context) == len(ids) + 7  # the 8th was sampled, never evaluated
        assert runs[0] == runs[1]
    finally:
        loader.unload(model)


def test_the_health_check_keeps_the_cache_for_the_next_turn(loader: CTransformersLoader, stories: Path) -> None:
    """The periodic check runs between a chat's turns: asked with what the cache holds, it evaluates one token and
    leaves the cache as it was, so the next turn evaluates only what is new."""
    model = loader.load(stories, context_length=None, gpu_layers=None)
    try:
        assert model.cached() == [] and loader.check(model)  # nothing cached yet: the check asks with a letter
        ids = model.tokenize("Once upon a time", add_bos=True)
        tokens = model.generate(ids, SamplingParams(temperature=0.0), lambda: False)
        answer = [next(tokens) for _ in range(8)]
        tokens.close()
        before = model.cached()
        assert before[: len(ids)] == ids and len(before) == len(ids) + 7
        assert loader.check(model)
        assert model.cached() == before
        tokens = model.generate(ids, SamplingParams(temperature=0.0), lambda: False)
        assert [next(tokens) for _ in range(8)] == answer  # the cache the check left gives the same answer
        tokens.close()
    finally:
        loader.unload(model)


def test_safe_tokenize_handles_prompts_that_overflow_ctransformers(loader: CTransformersLoader, stories: Path) -> None:
    # Emoji fall back to byte tokens: four tokens per character, more than LLM.tokenize has room for.
    model = loader.load(stories, context_length=None, gpu_layers=None)
    assert model.handle is not None
    prompt = "\N{SLIGHTLY SMILING FACE}" * 12
    assert len(safe_tokenize(model.handle, prompt)) > len(prompt) + 1
    loader.unload(model)


def test_kv_cache_estimate_is_f16() -> None:
    info = GGUFInfo("llama", 2048, block_count=5, embedding_length=64, head_count=8, head_count_kv=4, file_size=1)
    assert estimate_kv_cache_bytes(info, 512) == 2 * 5 * 512 * 32 * 2


def test_memory_estimate_is_file_plus_cache(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    assert estimate_memory_bytes(tiny, None) == info.file_size + estimate_kv_cache_bytes(info, 512)
    assert estimate_memory_bytes(tiny, 64) == info.file_size + 2 * 2 * 64 * 16 * 2


def test_not_gguf_is_rejected(loader: CTransformersLoader, tmp_path: Path) -> None:
    path = write_not_gguf(tmp_path / "notes.gguf")
    with pytest.raises(InvalidModelFile, match=r"notes\.gguf is not a GGUF model file"):
        read_gguf_info(path)
    with pytest.raises(InvalidModelFile, match="not a GGUF"):
        loader.load(path, context_length=None, gpu_layers=None)


@pytest.mark.parametrize("cut", ["first key", "middle of the header", "weights"])
def test_truncated_gguf_is_rejected_before_ctransformers_sees_it(
    loader: CTransformersLoader, tmp_path: Path, cut: str
) -> None:
    # ctransformers segfaults on a truncated header and maps truncated weights that crash later: the header
    # reader must catch all three before the file reaches it.
    full = write_tiny_llama(tmp_path / "full.gguf").stat().st_size
    keep = {"first key": 64, "middle of the header": 3000, "weights": full - 1000}[cut]
    path = write_truncated_gguf(tmp_path / "cut.gguf", keep_bytes=keep)
    with pytest.raises(InvalidModelFile, match=r"cut\.gguf is damaged") as excinfo:
        loader.load(path, context_length=None, gpu_layers=None)
    assert excinfo.value.message == str(excinfo.value)
    assert excinfo.value.__cause__ is not None


def test_architecture_ctransformers_cannot_run_is_rejected(loader: CTransformersLoader, tmp_path: Path) -> None:
    path = tmp_path / "snake.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_info(path).architecture == "mamba"
    with pytest.raises(InvalidModelFile, match=r"snake\.gguf as a 'mamba' model") as excinfo:
        loader.load(path, context_length=None, gpu_layers=None)
    assert "Traceback" not in excinfo.value.message


def test_pad_to_bytes_makes_a_big_file_that_still_loads(loader: CTransformersLoader, tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "five.gguf", pad_to_bytes=5 * MB)
    assert 5 * MB <= path.stat().st_size < 5 * MB + 64_000
    model = loader.load(path, context_length=None, gpu_layers=None)
    assert model.size_bytes == path.stat().st_size
    assert model.handle is not None
    assert isinstance(model.handle("hello", max_new_tokens=3), str)
    loader.unload(model)


def test_unload_gives_memory_back(loader: CTransformersLoader, tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "fifty.gguf", pad_to_bytes=50 * MB)
    model = loader.load(path, context_length=None, gpu_layers=None)
    loader.unload(model)
    del model
    settled = rss()

    # llama.cpp maps the file with MAP_POPULATE, so every live model shows in RSS: this test can see a leak.
    alive = [loader.load(path, context_length=None, gpu_layers=None) for _ in range(5)]
    assert rss() - settled > 4 * 40 * MB
    for model in alive:
        loader.unload(model)
    del alive, model
    gc.collect()
    assert rss() - settled < 30 * MB

    for _ in range(5):
        model = loader.load(path, context_length=None, gpu_layers=None)
        assert model.handle is not None
        model.handle.eval(safe_tokenize(model.handle, "a"))
        loader.unload(model)
        del model
    assert rss() - settled < 30 * MB


def test_resolve_lib_auto_explicit_and_cuda() -> None:
    from workers.backend import choose_lib, cuda_problem, gpu_visible, resolve_lib

    if not gpu_visible():
        assert resolve_lib("auto") == choose_lib()
    assert resolve_lib("basic") == "basic"
    with pytest.raises(ValueError, match="unknown ctransformers build"):
        resolve_lib("tpu")
    if cuda_problem() is None:
        assert resolve_lib("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match=r"ctransformers\[cuda\]"):
            resolve_lib("cuda")


def test_an_explicit_cpu_build_loads(tmp_path: Path) -> None:
    from workers.backend import resolve_lib

    model = CTransformersLoader(threads=1, lib=resolve_lib("basic")).load(
        write_tiny_llama(tmp_path / "m.gguf"), context_length=64, gpu_layers=None
    )
    assert model.context_length == 64


def test_a_nul_character_is_refused_not_cut_at(loader: CTransformersLoader, stories: Path) -> None:
    """ctransformers reads the prompt as a C string: "Once\\0 upon" was tokenized as "Once" alone."""
    model = loader.load(stories, context_length=None, gpu_layers=None)
    with pytest.raises(InvalidRequest, match=r"NUL character \(U\+0000\) at position 4"):
        model.tokenize("Once\x00 upon a time", add_bos=True)
    assert model.tokenize("Once upon a time", add_bos=True) == safe_tokenize(model.handle, "Once upon a time")
    loader.unload(model)
