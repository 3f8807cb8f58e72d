"""The model files a node offers: every `.gguf` under its models directory, with the backend a load would use
and its memory estimate with that backend.

A file's id is its path relative to the directory without `.gguf`, with `/` separators: exactly the id that
loads it (`resolve_model_path`). Files no load could name are left out: symlinks that resolve outside the
directory and names that are not valid model ids. A file whose GGUF header cannot be read (not a GGUF,
truncated), or that no backend on this node can run, is listed with its `problem` and no estimate: it is there,
and a load of it fails with that reason. Each other file names the backend a load would use and its estimate
with that backend. Plans are cached by path, size and mtime, so a catalog of an unchanged directory only stats
its files.
"""

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker.errors import InvalidModelFile, InvalidModelId
from broker.schemas import ModelFile, check_model_id

log = logging.getLogger(__name__)

SUFFIX = ".gguf"


@dataclass(frozen=True)
class FilePlan:
    """Which backend a load of a file would use, and what that load would reserve."""

    backend: str | None
    """None: no load of the file can happen here; `problem` says why."""
    estimate_bytes: int | None
    problem: str | None = None


class Planner(Protocol):
    """`workers.backends.Backends.plan`: raises InvalidModelFile for an unreadable header, InvalidRequest for an
    unknown backend name."""

    def __call__(self, path: Path, context_length: int | None, backend: str | None = None) -> FilePlan: ...


class FileCatalog:
    """Scans one models directory on demand; thread-safe, since catalog jobs may run side by side."""

    def __init__(self, models_dir: Path, plan: Planner) -> None:
        self.root = models_dir.resolve()
        self._plan = plan
        self._lock = threading.Lock()
        # path -> (size, mtime_ns, plan)
        self._cache: dict[str, tuple[int, int, FilePlan]] = {}

    def files(self) -> list[ModelFile]:
        found: list[ModelFile] = []
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith(SUFFIX):
                    continue
                entry = self._entry(Path(dirpath) / name, seen)
                if entry is not None:
                    found.append(entry)
        with self._lock:  # forget deleted files so the cache never outgrows the directory
            for gone in set(self._cache) - seen:
                del self._cache[gone]
        return found

    def _entry(self, path: Path, seen: set[str]) -> ModelFile | None:
        model_id = path.relative_to(self.root).as_posix()[: -len(SUFFIX)]
        try:
            check_model_id(model_id)
            real = path.resolve()
            if not real.is_relative_to(self.root) or not real.is_file():
                return None
            stat = real.stat()
        except (InvalidModelId, OSError, RuntimeError):  # Python 3.11's resolve() raises RuntimeError on a loop
            return None
        seen.add(str(real))
        plan = self._plan_cached(real, stat.st_size, stat.st_mtime_ns)
        return ModelFile(
            id=model_id,
            path=str(real),
            size_bytes=stat.st_size,
            estimate_bytes=plan.estimate_bytes,
            problem=plan.problem,
            backend=plan.backend,
        )

    def _plan_cached(self, real: Path, size: int, mtime_ns: int) -> FilePlan:
        key = str(real)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[:2] == (size, mtime_ns):
            return cached[2]
        try:
            plan = self._plan(real, None)
        except InvalidModelFile as exc:
            plan = FilePlan(None, None, exc.message)
        except OSError as exc:
            plan = FilePlan(None, None, f"{real.name} cannot be read: {exc.strerror or exc}")
        if plan.problem:
            log.info("catalog: %s cannot be loaded: %s", real.name, plan.problem)
        with self._lock:
            self._cache[key] = (size, mtime_ns, plan)
        return plan
