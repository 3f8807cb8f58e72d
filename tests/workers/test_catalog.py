"""FileCatalog: what a node offers for pool placement, from real GGUF files on disk."""

import os
from pathlib import Path

from workers.backend import CTransformersLoader, estimate_memory_bytes
from workers.backends import Backends
from workers.catalog import FileCatalog, FilePlan
from workers.gguf_factory import write_not_gguf, write_tiny_llama, write_tiny_qwen2, write_truncated_gguf

PLAN = Backends([CTransformersLoader(threads=1)], missing={"llama-cpp": "pip install 'modelfleet[llama-cpp]'"}).plan


class CountingPlanner:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path, context_length: int | None, backend: str | None = None) -> FilePlan:
        self.calls.append(path)
        return PLAN(path, context_length, backend)


def test_ids_are_relative_posix_paths_with_real_estimates(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "org" / "deep").mkdir(parents=True)
    write_tiny_llama(root / "top.gguf")
    write_tiny_llama(root / "org" / "deep" / "nested.gguf", pad_to_bytes=300_000)
    (root / "notes.txt").write_text("not a model")
    files = FileCatalog(root, PLAN).files()
    assert sorted(f.id for f in files) == ["org/deep/nested", "top"]
    nested = next(f for f in files if f.id == "org/deep/nested")
    assert nested.path == str((root / "org" / "deep" / "nested.gguf").resolve())
    assert nested.size_bytes == (root / "org" / "deep" / "nested.gguf").stat().st_size >= 300_000
    assert nested.estimate_bytes == estimate_memory_bytes(Path(nested.path), None) > nested.size_bytes


def test_lists_unreadable_files_with_their_problem_and_leaves_out_escapes_and_bad_ids(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write_tiny_llama(root / "good.gguf")
    write_tiny_llama(outside / "secret.gguf")
    (root / "escape.gguf").symlink_to(outside / "secret.gguf")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    (root / "alias.gguf").symlink_to(root / "good.gguf")  # inside: loadable, so listed
    (root / "loop.gguf").symlink_to(root / "loop.gguf")  # resolve() raises RuntimeError on Python 3.11
    write_not_gguf(root / "text.gguf")
    write_truncated_gguf(root / "cut.gguf")
    write_tiny_llama(root / "a..b.gguf")  # no load could name it: ".." is refused in a model id
    files = {f.id: f for f in FileCatalog(root, PLAN).files()}
    assert sorted(files) == ["alias", "cut", "good", "text"]
    assert files["good"].problem is None and files["good"].estimate_bytes
    for broken in ("cut", "text"):  # there, so listed; not loadable, so no estimate and the reason why
        assert files[broken].estimate_bytes is None and files[broken].size_bytes > 0
        assert files[broken].problem and "GGUF" in files[broken].problem, files[broken].problem


def test_unchanged_files_are_not_read_again(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    write_tiny_llama(root / "a.gguf")
    write_not_gguf(root / "bad.gguf")
    estimator = CountingPlanner()
    catalog = FileCatalog(root, estimator)
    catalog.files()
    catalog.files()
    assert len(estimator.calls) == 2, "each file, readable or not, is estimated once while unchanged"
    stat = (root / "a.gguf").stat()
    os.utime(root / "a.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert [f.id for f in catalog.files()] == ["a", "bad"] and len(estimator.calls) == 3
    (root / "a.gguf").unlink()
    (root / "bad.gguf").unlink()
    assert catalog.files() == []


def test_each_file_names_the_backend_that_would_take_it(tmp_path: Path) -> None:
    """A file only a missing backend can run is listed, without a backend and with what is missing."""
    write_tiny_llama(tmp_path / "old.gguf")
    write_tiny_qwen2(tmp_path / "new.gguf")
    files = {f.id: f for f in FileCatalog(tmp_path, PLAN).files()}
    assert files["old"].backend == "ctransformers" and files["old"].problem is None
    assert files["new"].backend is None and files["new"].estimate_bytes is None
    assert files["new"].problem == (
        "Cannot load new.gguf: architecture qwen2 needs the llama-cpp backend: pip install 'modelfleet[llama-cpp]'."
    )
