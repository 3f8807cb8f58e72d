"""The backends a node runs GGUF models with, and the choice of one per file, made from its header before loading.

A backend is one small protocol (`Backend`): say what in a file it cannot run, estimate the memory a load
takes, load, check, unload; the models it loads are the generic inference layer's models (tokenize, generate
with cancellation). `Backends` holds the ones this node runs and is what the model manager calls: it picks the
backend for each load and sends unload and check to the backend that loaded the model. A third backend is one
more entry in `REGISTRY` and a module that implements `Backend`; the manager, the tasks and the API do not change.

With `--backend auto` (the default) each file goes to the first backend in `REGISTRY` order that can run it:
ctransformers for what it supports, llama.cpp for the rest. A file no backend here can run fails with a reason
that names what is missing ("architecture qwen3 needs the llama-cpp backend: pip install ...").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from broker.errors import BackendUnavailable, InvalidRequest
from workers.backend_rules import ctransformers_problem, llama_cpp_problem
from workers.catalog import FilePlan
from workers.gguf_info import GGUFInfo, read_gguf_info
from workers.manager import Loaded

if TYPE_CHECKING:
    from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

AUTO = "auto"


class Backend(Protocol):
    """One way to run GGUF models in this process. Implementations: `workers.backend.CTransformersLoader`,
    `workers.llama_backend.LlamaCppBackend`."""

    name: str

    def problem(self, info: GGUFInfo) -> str | None:
        """What in the file this backend cannot run, as a noun phrase ("architecture qwen2"), or None if it can.
        Decided from the header alone: nothing is loaded."""
        ...

    def estimate_bytes(self, info: GGUFInfo, context_length: int | None) -> int:
        """The memory a load with `context_length` (None: this backend's default) takes."""
        ...

    def load(self, path: Path, *, context_length: int | None, gpu_layers: int | None) -> Loaded:
        """Load the model; raises `InvalidModelFile` or `ModelLoadFailed` with the reason. What it returns also
        implements `workers.inference.backend.InferenceModel`, which is how the model is served."""
        ...

    def unload(self, model: Any) -> None: ...

    def check(self, model: Any) -> bool:
        """Whether the model answers: generates a token, cheaply (`workers.inference.backend.answers`)."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """A backend this version of modelfleet knows: how to build it, and how to install it when it is missing."""

    name: str
    install: str
    problem: Callable[[GGUFInfo], str | None]
    """`Backend.problem`, answerable without the backend's library: the reason names a backend that is missing."""
    create: Callable[[WorkerSettings], Backend]
    """Raises ImportError when the backend's library is not installed."""


def _ctransformers(settings: WorkerSettings) -> Backend:
    from workers.backend import CTransformersLoader, resolve_lib

    lib = resolve_lib(settings.lib)
    log.info("ctransformers build %s", lib)
    return CTransformersLoader(threads=settings.threads, lib=lib)


def _llama_cpp(settings: WorkerSettings) -> Backend:
    from workers.llama_backend import LlamaCppBackend

    return LlamaCppBackend(threads=settings.threads)


REGISTRY: tuple[BackendSpec, ...] = (
    BackendSpec(
        "ctransformers",
        "pip install modelfleet (ctransformers is one of its dependencies)",
        ctransformers_problem,
        _ctransformers,
    ),
    BackendSpec("llama-cpp", "pip install 'modelfleet[llama-cpp]'", llama_cpp_problem, _llama_cpp),
)
"""Every backend, in the order `auto` tries them."""
BACKEND_NAMES = tuple(spec.name for spec in REGISTRY)


class Backends:
    """The backends one node runs; the model manager's loader. `mode` is the node's `--backend`."""

    def __init__(self, backends: list[Backend], *, mode: str = AUTO, missing: dict[str, str] | None = None) -> None:
        """`missing`: backend name -> how to install it, for the backends `auto` could not build here."""
        if not backends:
            raise ValueError("a node needs at least one backend")
        self.mode = mode
        self._backends = {b.name: b for b in backends}
        self._missing = dict(missing or {})

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def describe(self) -> str:
        """For the start-up log: "ctransformers, llama-cpp (--backend auto)", and what is not installed."""
        missing = f"; not installed: {', '.join(self._missing)}" if self._missing else ""
        return f"{', '.join(self._backends)} (--backend {self.mode}){missing}"

    def check_request(self, requested: str | None) -> None:
        """Refuse a backend name no version of this node knows (bad input: nothing changes)."""
        if requested is not None and requested not in BACKEND_NAMES:
            raise InvalidRequest(
                f"Unknown backend {requested[:40]!r}; this node knows {', '.join(BACKEND_NAMES)}.",
                backend=requested[:40],
            )

    def choose(self, path: Path, info: GGUFInfo, requested: str | None = None) -> Backend:
        """The backend that loads `path`; raises BackendUnavailable with a reason that names what is missing."""
        self.check_request(requested)
        if requested is not None:
            return self._requested(path, info, requested)
        refusals: list[tuple[str, str]] = []
        for backend in self._backends.values():
            what = backend.problem(info)
            if what is None:
                return backend
            refusals.append((backend.name, what))
        what = refusals[0][1]
        for spec in REGISTRY:
            if spec.name in self._backends or spec.problem(info) is not None:
                continue
            if spec.name in self._missing:
                reason = f"{what} needs the {spec.name} backend: {self._missing[spec.name]}"
            else:
                reason = f"{what} needs the {spec.name} backend, but this node runs only --backend {self.mode}"
            raise BackendUnavailable(
                f"Cannot load {path.name}: {reason}.", backend=spec.name, architecture=info.architecture
            )
        refusals += [
            (spec.name, p) for spec in REGISTRY if spec.name not in self._backends and (p := spec.problem(info))
        ]
        said = "; ".join(f"{name} cannot run {what}" for name, what in refusals)
        raise BackendUnavailable(
            f"Cannot load {path.name}: no backend can run it ({said}).", architecture=info.architecture
        )

    def _requested(self, path: Path, info: GGUFInfo, requested: str) -> Backend:
        backend = self._backends.get(requested)
        if backend is None:
            if requested in self._missing:
                why = f"the {requested} backend is not installed on this node: {self._missing[requested]}"
            else:
                why = f"this node runs only --backend {self.mode}"
            raise BackendUnavailable(f"Cannot load {path.name} with {requested}: {why}.", backend=requested)
        what = backend.problem(info)
        if what is not None:
            raise BackendUnavailable(
                f"Cannot load {path.name} with {requested}: it cannot run {what}.",
                backend=requested,
                architecture=info.architecture,
            )
        return backend

    def plan(self, path: Path, context_length: int | None, backend: str | None = None) -> FilePlan:
        """The backend a load would use and its memory estimate; raises InvalidModelFile for an unreadable header.
        A file no backend here can run gets no backend and no estimate, and the reason as its problem."""
        info = read_gguf_info(path)
        try:
            chosen = self.choose(path, info, backend)
        except BackendUnavailable as exc:
            return FilePlan(None, None, exc.message)
        return FilePlan(chosen.name, chosen.estimate_bytes(info, context_length))

    def load(
        self, path: Path, *, context_length: int | None, gpu_layers: int | None, backend: str | None = None
    ) -> Loaded:
        chosen = self.choose(path, read_gguf_info(path), backend)
        return chosen.load(path, context_length=context_length, gpu_layers=gpu_layers)

    def unload(self, model: Loaded) -> None:
        self._backends[model.backend].unload(model)

    def check(self, model: Loaded) -> bool:
        return self._backends[model.backend].check(model)


def build_backends(settings: WorkerSettings) -> Backends:
    """The backends `settings.backend` asks for. Raises RuntimeError when an explicitly chosen one is missing."""
    mode = settings.backend
    built: list[Backend] = []
    missing: dict[str, str] = {}
    for spec in REGISTRY:
        if mode not in (AUTO, spec.name):
            continue
        try:
            built.append(spec.create(settings))
        except ImportError as exc:
            if mode != AUTO:
                raise RuntimeError(f"--backend {spec.name} is not installed ({exc}): {spec.install}") from exc
            log.info("backend %s is not installed (%s); files only it can run will fail to load", spec.name, exc)
            missing[spec.name] = spec.install
    if not built:
        raise RuntimeError("no backend is installed: pip install modelfleet")
    return Backends(built, mode=mode, missing=missing)
