"""What a node does for each job, free of Celery: resolve the file, admit, call the manager, shape the reply."""

from concurrent.futures import Future
from pathlib import Path

from pydantic import BaseModel

from broker.errors import BackendUnavailable, InvalidModelFile
from broker.schemas import (
    LoadJob,
    LoadResult,
    ModelFile,
    ModelList,
    NodeCatalog,
    UnloadAllJob,
    UnloadAllResult,
    UnloadFailure,
    UnloadJob,
    UnloadResult,
)
from workers.catalog import FileCatalog, Planner
from workers.manager import LoadOutcome, ModelManager
from workers.paths import resolve_model_path

Files = list[ModelFile]


class NodeService:
    """The operations one node offers; each returns the schema the API passes on."""

    def __init__(self, *, fingerprint: str, models_dir: Path, manager: ModelManager, plan: Planner) -> None:
        """`plan` picks the backend for a file and estimates its load (`workers.backends.Backends.plan`)."""
        self.fingerprint = fingerprint
        self.models_dir = models_dir
        self.manager = manager
        self._plan = plan
        self._files = FileCatalog(models_dir, plan)

    def load(self, job: LoadJob) -> LoadResult:
        if not job.force_reload:
            # A loaded model is left alone, as model-loading.txt promises: its file is not even looked at, so a
            # file replaced or damaged since cannot fail a load that has nothing to do.
            loaded = self.manager.if_loaded(job.model_id, pin=job.pin, keep_alive=job.keep_alive)
            if loaded is not None:
                return self._load_result(job, loaded)
        path = resolve_model_path(self.models_dir, job.model_id, job.model_path)
        # Planned before the manager's lock (headers are cached by mtime); it decides there whether to use it.
        # A file that cannot be loaded (unreadable, or no backend here runs it) is refused with the reason and
        # listed `failed`, like a load that failed.
        try:
            plan = self._plan(path, job.context_length, job.backend)
            if plan.backend is None or plan.estimate_bytes is None:
                raise BackendUnavailable(plan.problem or f"No backend on this node can load {path.name}.")
        except (InvalidModelFile, BackendUnavailable) as exc:
            self.manager.fail(job.model_id, path, exc)
            raise
        outcome = self.manager.load(
            job.model_id,
            path,
            context_length=job.context_length,
            gpu_layers=job.gpu_layers,
            estimate_bytes=plan.estimate_bytes,
            force_reload=job.force_reload,
            evict=job.evict,
            pin=job.pin,
            keep_alive=job.keep_alive,
            deadline=job.deadline,
            backend=plan.backend,
        )
        return self._load_result(job, outcome)

    def join_load(self, job: LoadJob) -> "Future[BaseModel] | None":
        """If the model is loading, a future of this job's result when that load ends; else None."""
        if job.force_reload:
            return None
        loading = self.manager.loading(job.model_id, pin=job.pin)
        if loading is None:
            return None
        joined: Future[BaseModel] = Future()

        def settle(done: "Future[LoadOutcome]") -> None:
            error = done.exception()
            if error is not None:
                joined.set_exception(error)
            else:
                joined.set_result(self._load_result(job, done.result()))

        loading.add_done_callback(settle)
        return joined

    def _load_result(self, job: LoadJob, outcome: LoadOutcome) -> LoadResult:
        return LoadResult(
            model_id=job.model_id,
            node=self.fingerprint,
            state=outcome.model.state,
            load_seconds=outcome.load_seconds,
            already_loaded=outcome.already_loaded,
            evicted=list(outcome.evicted),
        )

    def unload(self, job: UnloadJob) -> UnloadResult:
        info = self.manager.unload(job.model_id, deadline=job.deadline)
        return UnloadResult(model_id=job.model_id, node=self.fingerprint, state=info.state)

    def unload_all(self, job: UnloadAllJob) -> UnloadAllResult:
        unloaded, failures = self.manager.unload_all(deadline=job.deadline)
        return UnloadAllResult(
            node=self.fingerprint,
            unloaded=unloaded,
            errors=[UnloadFailure(model_id=m, code=e.code, error=e.message) for m, e in failures],
        )

    def files(self) -> "Files":
        return self._files.files()

    def list(self) -> ModelList:
        return ModelList(data=self.manager.models())

    def catalog(self) -> NodeCatalog:
        return NodeCatalog(
            node=self.fingerprint,
            files=self._files.files(),
            models=self.manager.models(),
            memory=self.manager.memory(),
        )
