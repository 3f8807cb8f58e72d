"""Which backend takes a file, decided from its GGUF header before anything loads, against real GGUF files."""

from dataclasses import replace
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q

from broker.errors import BackendUnavailable, InvalidRequest
from workers import backends
from workers.backend import CTransformersLoader
from workers.backend_rules import ctransformers_problem, llama_cpp_problem
from workers.backends import Backend, Backends, build_backends
from workers.gguf_factory import write_tiny_llama, write_tiny_llama3, write_tiny_qwen2, write_unknown_architecture
from workers.gguf_info import read_gguf_info
from workers.settings import WorkerSettings

INSTALL = "pip install 'modelfleet[llama-cpp]'"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    return {
        "llama": write_tiny_llama(root / "llama.gguf"),
        "qwen2": write_tiny_qwen2(root / "qwen2.gguf"),
        "llama3": write_tiny_llama3(root / "llama3.gguf"),
        "unknown": write_unknown_architecture(root / "unknown.gguf"),
        "bf16": write_tiny_llama(root / "bf16.gguf", weight_type=Q.BF16),
    }


@pytest.fixture(scope="module")
def ctransformers_only() -> Backends:
    """A node with `auto` where llama-cpp-python is not installed."""
    return Backends([CTransformersLoader(threads=1)], missing={"llama-cpp": INSTALL})


def test_auto_gives_ctransformers_what_it_runs(ctransformers_only: Backends, files: dict[str, Path]) -> None:
    plan = ctransformers_only.plan(files["llama"], None)
    assert plan.backend == "ctransformers" and plan.problem is None
    assert plan.estimate_bytes > files["llama"].stat().st_size


@pytest.mark.parametrize(
    ("name", "what"),
    [("qwen2", "architecture qwen2"), ("llama3", "a gpt2 (byte-level BPE) vocabulary"), ("bf16", "tensor types BF16")],
)
def test_a_file_only_llama_cpp_runs_names_what_to_install(
    ctransformers_only: Backends, files: dict[str, Path], name: str, what: str
) -> None:
    path = files[name]
    with pytest.raises(BackendUnavailable) as excinfo:
        ctransformers_only.choose(path, read_gguf_info(path))
    assert excinfo.value.message == f"Cannot load {name}.gguf: {what} needs the llama-cpp backend: {INSTALL}."
    assert excinfo.value.details["backend"] == "llama-cpp"
    plan = ctransformers_only.plan(path, None)
    assert plan.backend is None and plan.problem == excinfo.value.message


def test_a_file_no_backend_runs_says_so(ctransformers_only: Backends, files: dict[str, Path]) -> None:
    path = files["unknown"]
    with pytest.raises(BackendUnavailable, match="no backend can run it") as excinfo:
        ctransformers_only.choose(path, read_gguf_info(path))
    assert "ctransformers cannot run architecture nosucharch" in excinfo.value.message
    assert "llama-cpp cannot run architecture nosucharch" in excinfo.value.message


def test_a_node_fixed_to_ctransformers_says_which_flag_refuses(files: dict[str, Path]) -> None:
    fixed = Backends([CTransformersLoader(threads=1)], mode="ctransformers")
    with pytest.raises(BackendUnavailable, match=r"needs the llama-cpp backend, but this node runs only --backend"):
        fixed.choose(files["qwen2"], read_gguf_info(files["qwen2"]))


def test_an_explicit_backend_is_checked(ctransformers_only: Backends, files: dict[str, Path]) -> None:
    llama, qwen2 = files["llama"], files["qwen2"]
    assert ctransformers_only.choose(llama, read_gguf_info(llama), "ctransformers").name == "ctransformers"
    with pytest.raises(BackendUnavailable, match=r"with llama-cpp: the llama-cpp backend is not installed"):
        ctransformers_only.choose(llama, read_gguf_info(llama), "llama-cpp")
    with pytest.raises(BackendUnavailable, match=r"with ctransformers: it cannot run architecture qwen2"):
        ctransformers_only.choose(qwen2, read_gguf_info(qwen2), "ctransformers")
    with pytest.raises(InvalidRequest, match="Unknown backend 'vllm'"):
        ctransformers_only.plan(llama, None, "vllm")


def test_tensor_types_ctransformers_predates_go_elsewhere(files: dict[str, Path]) -> None:
    info = read_gguf_info(files["llama"])
    assert ctransformers_problem(info) is None
    newer = replace(info, tensor_types=frozenset({int(Q.F32), int(Q.IQ2_XS), int(Q.BF16)}))
    assert ctransformers_problem(newer) == "tensor types BF16, IQ2_XS"
    assert llama_cpp_problem(newer) is None


def test_a_missing_library_is_named_at_start_or_left_to_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llama-cpp-python: `--backend llama-cpp` refuses to start, saying how to install it; `auto` runs
    ctransformers alone and names the missing backend in each refusal."""

    def not_installed(settings: WorkerSettings) -> Backend:
        raise ImportError("No module named 'llama_cpp'")

    registry = tuple(replace(s, create=not_installed) if s.name == "llama-cpp" else s for s in backends.REGISTRY)
    monkeypatch.setattr(backends, "REGISTRY", registry)
    with pytest.raises(
        RuntimeError, match=r"--backend llama-cpp is not installed .*: pip install 'modelfleet\[llama-cpp\]'"
    ):
        build_backends(WorkerSettings(models_dir=tmp_path, threads=1, backend="llama-cpp"))
    auto = build_backends(WorkerSettings(models_dir=tmp_path, threads=1))
    assert auto.names == ["ctransformers"] and "not installed: llama-cpp" in auto.describe()
    qwen2 = write_tiny_qwen2(tmp_path / "q.gguf")
    assert (
        auto.plan(qwen2, None).problem
        == f"Cannot load q.gguf: architecture qwen2 needs the llama-cpp backend: {INSTALL}."
    )


def test_build_backends_follows_the_setting(tmp_path: Path) -> None:
    auto = build_backends(WorkerSettings(models_dir=tmp_path, threads=1))
    assert auto.names[0] == "ctransformers"
    fixed = build_backends(WorkerSettings(models_dir=tmp_path, threads=1, backend="ctransformers"))
    assert fixed.names == ["ctransformers"]
    with pytest.raises(ValueError, match="choose one of auto, ctransformers, llama-cpp"):
        WorkerSettings(models_dir=tmp_path, backend="vllm")
