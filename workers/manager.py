"""The models of one node, free of Celery and Redis.

One `ModelRecord` per model. The rules, per model:
- a load of a model that is loading joins that load: one load runs, every caller gets its outcome;
- a load of a loaded model answers `already_loaded=True` without reloading;
- an unload of a loading model waits for the load, then unloads; an unload of an unloading model joins it;
- `models()` answers at once: it takes only the short registry lock, never a model's in-flight operation.
- a load with `force_reload` of a loaded model drops the old copy and loads afresh, admitted as a new load.

Generations (see `acquire`): one at a time per loaded model, behind a bounded queue (full: ModelBusy). Each
holds a `Lease`; using a model refreshes its last use. An unload (explicit, idle, or a `force_reload`'s old copy)
first refuses new generations and wakes the queued ones with ModelNotLoaded, then waits for the running one up to
the unload's deadline (less `DRAIN_MARGIN`), then stops it (within one token) and waits until it has: the model is
never freed under a running generation. Eviction only picks idle models (or one whose only use is its first
check, which its unload waits for). A model whose keep-alive is set unloads
itself once unused for that long (`reap_idle`, reason `idle`).

Memory admission: a load reserves its estimate under the registry lock before it starts, so two concurrent
loads cannot both squeeze into the same free space; once loaded it keeps the larger of the estimate and the size
the backend reports, so the budget never counts a model as smaller than what was admitted.
With `evict`, the same locked step picks the least recently used, unpinned, loaded models whose bytes make
room and marks them unloading, so no other load can pick them or their space; they are unloaded before the
new model loads. If evicting every candidate would still not make room, nothing is evicted.
"""

import contextlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from broker.errors import (
    InsufficientMemory,
    JobTimeout,
    ModelBusy,
    ModelfleetError,
    ModelLoadFailed,
    ModelNotLoaded,
    ShuttingDown,
)
from broker.schemas import MemoryInfo, ModelInfo, ModelState, UnloadReason

log = logging.getLogger(__name__)

DRAIN_MARGIN = 1.0
"""Seconds before an unload's deadline at which running generations are stopped, so the reply still makes it."""
DEFAULT_MAX_QUEUE = 8


class Loaded(Protocol):
    @property
    def backend(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def context_length(self) -> int | None: ...

    @property
    def gpu_layers(self) -> int | None: ...


class Loader(Protocol):
    """What the manager needs from the backends; `workers.backends.Backends` is the real one.

    What `load` returns is what a generation's lease hands out (`Lease.model`): to be served, it also implements
    `workers.inference.backend.InferenceModel`. `check` is called only under the model's lease, never beside a
    generation (the first time right after `load`, on a thread of its own); it should make the model answer
    (generate a token), cheaply.
    """

    def load(
        self, path: Path, *, context_length: int | None, gpu_layers: int | None, backend: str | None
    ) -> Loaded: ...

    # The manager hands back exactly what `load` returned; `Any` lets each backend name its own type.
    def unload(self, model: Any) -> None: ...

    def check(self, model: Any) -> bool: ...


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("This node is shutting down; the head sends the request to another replica.")


FileStamp = tuple[int, int, int, int]
"""A file's device, inode, size and modification time (ns)."""


def file_stamp(path: Path) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ModelRecord:
    """Everything the node knows about one model."""

    model_id: str
    path: Path
    state: ModelState
    context_length: int | None
    gpu_layers: int | None
    size_bytes: int
    reserved_bytes: int = 0
    loaded_at: datetime | None = None
    last_used: float = 0.0
    healthy: bool = False
    checking: bool = False
    """Its first check (right after the load) is running: `healthy` is not known yet."""
    pinned: bool = False
    error: str | None = None
    measured_bytes: int | None = None
    endpoint: str | None = None
    keep_alive: float | None = None
    unload_reason: UnloadReason | None = None
    in_flight: int = 0
    queued: int = 0
    tokens_generated: int = 0
    generation_seconds: float = 0.0
    """A moving average of how long one generation holds the model: the `retry_after` of a full queue."""
    backend: str | None = None
    file_stamp: "FileStamp | None" = None
    """The file as it was when the load began (`file_stamp`)."""
    handle: Loaded | None = field(default=None, repr=False)
    pending: "Future[Any] | None" = field(default=None, repr=False)
    leases: "set[Lease]" = field(default_factory=set, repr=False)

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.queued)

    @property
    def rewritten(self) -> bool:
        """Whether the file this loaded model maps was written over in place since the load. Its weights are
        memory-mapped: pages cut off by a shorter file raise SIGBUS when read, which kills the node with every
        model in it (`cp` over a loaded model did, at its next health check), and a longer one holds other
        weights. A file replaced by a rename is another inode; the model keeps the old one, intact."""
        if self.file_stamp is None:
            return False
        now = file_stamp(self.path)
        return now is not None and now[:2] == self.file_stamp[:2] and now[2:] != self.file_stamp[2:]

    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.model_id,
            path=str(self.path),
            endpoint=self.endpoint if self.state is ModelState.LOADED else None,
            healthy=self.healthy and self.state is ModelState.LOADED,
            checking=self.checking and self.state is ModelState.LOADED,
            state=self.state,
            context_length=self.context_length,
            gpu_layers=self.gpu_layers,
            loaded_at=self.loaded_at,
            size_bytes=self.size_bytes,
            error=self.error,
            pinned=self.pinned,
            measured_bytes=self.measured_bytes,
            in_flight=self.in_flight,
            queued=self.queued,
            tokens_generated=self.tokens_generated + sum(lease.tokens for lease in self.leases),
            last_used=datetime.fromtimestamp(self.last_used, UTC) if self.last_used else None,
            keep_alive=self.keep_alive,
            unload_reason=self.unload_reason,
            backend=self.backend,
        )


class Lease:
    """The right to run one generation on a loaded model: `model` is the backend's object, to use until released.

    `stopped` turns true when the holder should stop (its client left: `stop()`; or an unload's deadline came);
    a generation checks it before each token. Release exactly once (or use `with`).
    """

    def __init__(self, manager: "ModelManager", record: ModelRecord, *, quiet: bool = False) -> None:
        self._manager = manager
        self.quiet = quiet
        """Taken by `try_acquire` (a health check): its start and end are not announced as usage."""
        self._record = record
        self.model_id = record.model_id
        self.model: Any = record.handle
        self.tokens = 0
        self.failed = False
        self._stop = threading.Event()
        self._released = False
        self.started = time.monotonic()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self, self._record)

    def release_locked(self) -> None:
        """`release`, for a caller that holds the manager's lock."""
        if not self._released:
            self._released = True
            self._manager._release_locked(self, self._record)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class LoadOutcome:
    model: ModelInfo
    load_seconds: float
    already_loaded: bool
    evicted: tuple[str, ...] = ()


ChangeHook = Callable[[str, ModelInfo, list[ModelInfo]], None]
"""`(event type, the model's record after the change, every model after it)`, called with the registry lock held,
in the order the changes happen, before anyone waiting on the change is woken: it must queue, never block."""


class ModelManager:
    """The in-memory models of one node, with per-model serialization and memory admission."""

    def __init__(
        self,
        loader: Loader,
        *,
        memory_budget: int | None = None,
        clock: Callable[[], float] = time.time,
        on_change: ChangeHook | None = None,
        memory_probe: Callable[[], int] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        keep_alive: float | None = None,
        endpoint: str | None = None,
        on_usage: Callable[[], None] | None = None,
    ) -> None:
        """`memory_probe` reads the process's memory in use (RSS); with it, each load that ran alone is measured
        and its reservation corrected upwards if the model took more than its estimate. `max_queue` generations
        may wait per model; `keep_alive` is the default idle TTL of a load (None: never); `endpoint` is the
        node's inference URL, listed with each loaded model. `on_usage` is called with the registry lock held
        whenever a generation is queued, starts or ends (its in-flight, queued and token figures move): like
        `on_change`, it must not block."""
        self._loader = loader
        self._max_queue = max_queue
        self._keep_alive = keep_alive or None
        self.endpoint = endpoint
        self._budget = memory_budget
        self._clock = clock
        self._on_change = on_change
        self._on_usage = on_usage
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        """Notified when a generation (or a check) ends or a model starts unloading: what queued generations, and
        unloads and reloads waiting for a model's first check, wait on."""
        self._records: dict[str, ModelRecord] = {}
        self._probe = memory_probe
        self._loads_begun = 0
        self._loads_running = 0
        self.closing = False
        """Set by `close`: the process is stopping, and no generation runs or starts any more."""

    def close(self) -> None:
        """The process is stopping: stop every running generation (within one token), send queued ones away and
        take no new one (each ends with ShuttingDown, which the head retries on another replica before the first
        byte, and sends as the stream's error event after it). Without this, a stop let streams run until the
        HTTP server's grace ran out and then cut them, logging a CancelledError for each."""
        with self._lock:
            self.closing = True
            for record in self._records.values():
                for lease in record.leases:
                    if not lease.quiet:  # a health check ends by itself within a token
                        lease.stop()
            self._changed.notify_all()

    @property
    def memory_budget(self) -> int | None:
        return self._budget

    def load(
        self,
        model_id: str,
        path: Path,
        *,
        context_length: int | None = None,
        gpu_layers: int | None = None,
        estimate_bytes: int = 0,
        force_reload: bool = False,
        evict: bool = False,
        pin: bool = False,
        keep_alive: float | None = None,
        deadline: float | None = None,
        backend: str | None = None,
    ) -> LoadOutcome:
        """Load `model_id` from `path`, or join its load, or answer that it is loaded (see the module rules).

        `backend` is passed to the loader as is: which backend runs the model is the loader's business.

        Raises InsufficientMemory (nothing evicted, nothing unloaded) if `estimate_bytes` does not fit.
        `keep_alive` (seconds, 0: never; None: the node's default) applies to a loaded model too. `deadline`
        bounds how long a `force_reload` waits for generations on the old copy.
        """
        ttl = (keep_alive or None) if keep_alive is not None else self._keep_alive
        while True:
            with self._lock:
                record = self._records.get(model_id)
                reloading = record is not None and record.state is ModelState.LOADED and force_reload
                if reloading and record is not None and self._wait_checked_locked(record, _margin(deadline)):
                    continue  # another reload or an unload may have come first: look again
                if record is None or record.state in (ModelState.FAILED, ModelState.UNLOADED) or reloading:
                    old = record if reloading else None
                    releasing = old.reserved_bytes if old is not None else 0
                    victims = self._admit(model_id, estimate_bytes, evict=evict, releasing=releasing)
                    future: Future[LoadOutcome] = Future()
                    record = ModelRecord(
                        model_id=model_id,
                        path=path,
                        state=ModelState.LOADING,
                        context_length=context_length,
                        gpu_layers=gpu_layers,
                        size_bytes=estimate_bytes,
                        reserved_bytes=estimate_bytes,
                        pinned=pin or (old is not None and old.pinned),
                        backend=backend,
                        pending=future,
                        endpoint=self.endpoint,
                        keep_alive=ttl if keep_alive is not None or old is None else old.keep_alive,
                    )
                    self._records[model_id] = record
                    if old is None:  # a reload announces itself once its old copy is gone (below)
                        self._emit_locked("model-loading", record)
                    evictions = [
                        (victim, self._begin_unload_locked(victim, UnloadReason.EVICTED)) for victim in victims
                    ]
                    break
                if record.state is ModelState.LOADED:
                    return self._touch_locked(record, pin=pin, keep_alive=keep_alive)
                assert record.pending is not None
                pending, joining = record.pending, record.state is ModelState.LOADING
                if joining:
                    record.pinned = record.pinned or pin  # a joiner's pin counts as much as the first caller's
            if joining:
                return pending.result()
            _wait_quietly(pending)  # unloading: once it is done, load afresh
        # The new record already holds the reservation; the old copy and the victims go before it loads.
        for victim, victim_future in evictions:
            self._unload_quietly(victim, victim_future)
        if old is not None:
            self._drop_old_copy(old, deadline)
            with self._lock:
                self._emit_locked("model-loading", record)
        outcome = self._run_load(record, future)
        return replace(outcome, evicted=tuple(victim.model_id for victim, _ in evictions))

    def if_loaded(self, model_id: str, *, pin: bool = False, keep_alive: float | None = None) -> LoadOutcome | None:
        """What `load` answers for a loaded model (`already_loaded`, pin and keep-alive applied), or None if
        `model_id` is not loaded: a caller can then skip everything a real load needs, its file included."""
        with self._lock:
            record = self._records.get(model_id)
            if record is None or record.state is not ModelState.LOADED:
                return None
            return self._touch_locked(record, pin=pin, keep_alive=keep_alive)

    def _touch_locked(self, record: ModelRecord, *, pin: bool, keep_alive: float | None) -> LoadOutcome:
        record.last_used = self._clock()
        record.pinned = record.pinned or pin
        if keep_alive is not None:
            record.keep_alive = keep_alive or None  # 0: never unload when idle
        return LoadOutcome(record.info(), 0.0, already_loaded=True)

    def fail(self, model_id: str, path: Path, error: ModelfleetError) -> None:
        """Record that `model_id` cannot be loaded (its file was refused before any load began), so lists and
        the pool status show it `failed` with the node's reason. A loaded or busy model is left as it is."""
        with self._lock:
            record = self._records.get(model_id)
            if record is not None and record.state not in (ModelState.FAILED, ModelState.UNLOADED):
                return
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            failed = ModelRecord(
                model_id=model_id,
                path=path,
                state=ModelState.FAILED,
                context_length=None,
                gpu_layers=None,
                size_bytes=size,
                error=error.message,
                endpoint=self.endpoint,
            )
            self._records[model_id] = failed
            self._emit_locked("model-load-failed", failed)

    def _admit(self, model_id: str, estimate: int, *, evict: bool, releasing: int = 0) -> list[ModelRecord]:
        """Decide, under the lock, whether `estimate` fits; returns the records to evict to make it fit.

        `releasing` is what the model's own old copy holds when it is being reloaded.
        """
        if self._budget is None or estimate <= 0:
            return []
        free = self._budget - self._used_locked() + releasing
        if estimate <= free:
            return []
        room, victims = free, []
        if evict:
            for candidate in self._evictable_locked(exclude=model_id):
                victims.append(candidate)
                room += candidate.reserved_bytes
                if estimate <= room:
                    return victims
        details = {"needed_bytes": estimate, "free_bytes": max(free, 0), "budget_bytes": self._budget}
        if evict:
            details["evictable_bytes"] = room - free
            hint = f" Evicting every unpinned loaded model would free only {room - free} more."
        else:
            hint = " Unload a model, or load with evict to unload the least recently used ones."
        raise InsufficientMemory(
            f"Model {model_id} needs about {estimate} bytes but this node has {max(free, 0)} of its "
            f"{self._budget}-byte budget free.{hint}",
            **details,
        )

    def _evictable_locked(self, *, exclude: str | None = None) -> list[ModelRecord]:
        """Loaded, unpinned, idle models, least recently used first. Loading, unloading and busy ones (a generation
        running or queued) are never candidates; one running only its first check is (its unload waits for it)."""
        candidates = [
            r
            for r in self._records.values()
            if r.state is ModelState.LOADED
            and not r.pinned
            and (not r.busy or (r.checking and r.in_flight == 1 and not r.queued))
            and r.model_id != exclude
        ]
        return sorted(candidates, key=lambda r: (r.last_used, r.model_id))

    def _begin_unload_locked(self, record: ModelRecord, reason: UnloadReason) -> "Future[ModelInfo]":
        future: Future[ModelInfo] = Future()
        record.state = ModelState.UNLOADING
        record.unload_reason = reason
        record.healthy = False
        record.pending = future
        self._changed.notify_all()  # queued generations give up
        self._emit_locked("model-unloading", record)
        return future

    def _unload_quietly(self, record: ModelRecord, future: "Future[ModelInfo]") -> None:
        try:
            self._run_unload(record, future)
        except Exception:
            # The record is gone and its reservation released whatever the backend said; the load goes on.
            log.exception("evicting %s failed in the backend", record.model_id)

    def _drop_old_copy(self, old: ModelRecord, deadline: float | None) -> None:
        """Free the handle of a model being reloaded; its record was already replaced by the new load."""
        with self._lock:
            old.state, old.healthy, old.reserved_bytes = ModelState.UNLOADING, False, 0
            old.unload_reason = UnloadReason.RELOADED
            self._changed.notify_all()
            self._emit_locked("model-unloading", old)
        self._drain(old, deadline)
        handle, old.handle = old.handle, None
        try:
            if handle is not None:
                self._loader.unload(handle)
        except Exception:
            log.exception("dropping the old copy of %s failed in the backend", old.model_id)
        finally:
            del handle
        with self._lock:
            old.state = ModelState.UNLOADED
            self._emit_locked("model-unloaded", old)

    def _used_locked(self) -> int:
        return sum(r.reserved_bytes for r in self._records.values() if r.state is not ModelState.FAILED)

    def _run_load(self, record: ModelRecord, future: "Future[LoadOutcome]") -> LoadOutcome:
        started = self._clock()
        with self._lock:
            self._loads_begun += 1
            self._loads_running += 1
            ticket, alone_at_start = self._loads_begun, self._loads_running == 1
        before = self._probe() if self._probe else 0
        stamp = file_stamp(record.path)
        try:
            handle = self._loader.load(
                record.path, context_length=record.context_length, gpu_layers=record.gpu_layers, backend=record.backend
            )
            grew = (self._probe() - before) if self._probe else None
        except BaseException as exc:
            with self._lock:
                self._loads_running -= 1
            error = (
                exc
                if isinstance(exc, ModelfleetError)
                else ModelLoadFailed(f"Loading {record.model_id} failed: {type(exc).__name__}: {exc}")
            )
            with self._lock:
                record.state = ModelState.FAILED
                record.error = error.message
                record.reserved_bytes = 0
                record.pending = None
                self._emit_locked("model-load-failed", record)
            future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            raise error from (exc if error is not exc else None)
        with self._lock:
            # A measurement is this model's only if no other load ran at any time during it.
            alone = alone_at_start and self._loads_running == 1 and self._loads_begun == ticket
            self._loads_running -= 1
            record.measured_bytes = grew if alone and grew is not None and grew >= 0 else None
            now = self._clock()
            record.handle = handle
            record.file_stamp = stamp
            record.state = ModelState.LOADED
            record.context_length = handle.context_length
            record.gpu_layers = handle.gpu_layers if handle.gpu_layers is not None else record.gpu_layers
            record.size_bytes = handle.size_bytes
            record.backend = handle.backend
            record.reserved_bytes = max(handle.size_bytes, record.reserved_bytes, record.measured_bytes or 0)
            record.loaded_at = datetime.fromtimestamp(now, UTC)
            record.last_used = now
            record.healthy, record.checking = False, True
            record.pending = None
            outcome = LoadOutcome(record.info(), round(now - started, 4), already_loaded=False)
            self._emit_locked("model-loaded", record)
            # Taken before anyone else can: nothing runs on the model before its check, which is what decides
            # `healthy` (and so whether the head routes to it). An unload waits for the check like for any use.
            record.in_flight += 1
            check = Lease(self, record, quiet=True)
            record.leases.add(check)
        future.set_result(outcome)
        try:
            threading.Thread(target=self._first_check, args=(check,), name="modelfleet-check", daemon=True).start()
        except RuntimeError:  # no thread to be had (a process at its limit): check here rather than never
            self._first_check(check)
        return outcome

    def _wait_checked_locked(self, record: ModelRecord, until: float | None) -> bool:
        """Let a just-loaded model's first check end (one token's time), but not past `until` (the manager's
        clock): an unload or reload waits so, so that `model-checked` comes before their events. Whether it
        waited: the lock was let go meanwhile, so whatever the caller decided before must be decided again."""
        waited = False
        while record.checking and record.state is ModelState.LOADED:
            left = None if until is None else until - self._clock()
            if left is not None and left <= 0:
                break
            self._changed.wait(left)
            waited = True
        return waited

    def wait_checked(self, model_id: str, timeout: float | None = None) -> ModelInfo | None:
        """The model once its first check after the load has ended (at most `timeout` seconds from now)."""
        with self._lock:
            record = self._records.get(model_id)
            if record is not None:
                self._wait_checked_locked(record, None if timeout is None else self._clock() + timeout)
            return record.info() if record else None

    def _first_check(self, lease: Lease) -> None:
        """The check after a load, off the load's answer: a one-token generation costs a forward pass over every
        weight (80 ms for 400 MB on a small CPU, seconds for a large model), which the caller of a load need not
        wait for. Its result goes out as `model-checked`, which is what makes the head route to the model."""
        record = lease._record
        healthy = False
        try:
            healthy = self._loader.check(lease.model)
        except Exception:
            log.exception("the first check of %s failed in the backend", record.model_id)
        finally:
            # One locked step: the lease's end, the answer and its event. A generation queued behind the check
            # starts only after it, so nothing sees the model idle-but-checking (which eviction may pick).
            with self._lock:
                lease.release_locked()
                record.checking = False
                if record.state is ModelState.LOADED:
                    record.healthy = healthy
                    if not healthy:
                        log.warning("model %s is loaded but did not answer its first check", record.model_id)
                    self._emit_locked("model-checked", record)

    def unload(self, model_id: str, *, deadline: float | None = None) -> ModelInfo:
        """Unload `model_id`; waits for a load in flight first, but never past `deadline` (a UNIX time), after
        which it raises JobTimeout and changes nothing: the caller has stopped waiting."""
        while True:
            with self._lock:
                record = self._records.get(model_id)
                if record is None:
                    raise ModelNotLoaded(f"Model {model_id} is not loaded on this node.")
                if record.state is ModelState.FAILED:
                    raise ModelNotLoaded(f"Model {model_id} is not loaded on this node (its last load failed).")
                if record.state is ModelState.LOADED:
                    if self._wait_checked_locked(record, _margin(deadline)):
                        continue  # another unload, an eviction or a reload may have come first: look again
                    future = self._begin_unload_locked(record, UnloadReason.REQUESTED)
                    break
                assert record.pending is not None
                pending, joining = record.pending, record.state is ModelState.UNLOADING
            self._wait_until(pending, deadline, model_id)
            if joining:
                return pending.result()
            # loading: it is done now, so unload what it loaded (or report that it failed)
        return self._run_unload(record, future, deadline)

    def _wait_until(self, pending: "Future[Any]", deadline: float | None, model_id: str) -> None:
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        try:
            pending.result(timeout)
        except FutureTimeout:
            raise JobTimeout(
                f"Model {model_id} was still loading when the unload's deadline passed; nothing was unloaded.",
            ) from None
        except BaseException:  # noqa: S110 - the caller re-reads the record's state and decides
            pass

    def _run_unload(self, record: ModelRecord, future: "Future[ModelInfo]", deadline: float | None = None) -> ModelInfo:
        """Unload a record that `_begin_unload_locked` marked unloading, once no generation runs on it; releases
        its reservation."""
        self._drain(record, deadline)
        handle, record.handle = record.handle, None
        try:
            if handle is not None:
                self._loader.unload(handle)
        finally:
            del handle
            with self._lock:
                record.state = ModelState.UNLOADED
                record.pending = None
                record.reserved_bytes = 0
                if self._records.get(record.model_id) is record:
                    del self._records[record.model_id]
                info = record.info()
                self._emit_locked("model-unloaded", record)
            future.set_result(info)
        return info

    def _drain(self, record: ModelRecord, deadline: float | None) -> None:
        """Wait until no generation runs on `record` (marked unloading, so none starts): up to `deadline` less
        `DRAIN_MARGIN`, then stop the running ones and wait for them to notice (within one token)."""
        with self._lock:
            until = _margin(deadline)
            while record.in_flight:
                left = None if until is None else until - self._clock()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
            if record.in_flight:
                log.warning(
                    "unloading %s: stopping %d running generation(s) at the deadline", record.model_id, record.in_flight
                )
                for lease in record.leases:
                    lease.stop()
            while record.in_flight:
                self._changed.wait()

    def acquire(self, model_id: str, *, cancelled: threading.Event | None = None) -> Lease:
        """Take the model for one generation, waiting in its queue while another runs.

        Raises ModelNotLoaded if it is not loaded (or starts unloading while this waits), ModelBusy (with
        `retry_after` seconds) if its queue is full, and GenerationCancelled if `cancelled` is set while this
        waits (set it, then call `wake()`).
        """
        known = self._records.get(model_id)  # the file's stat, outside the lock (a slow disk stalls no one else)
        if known is not None and known.rewritten:  # no generation may read its pages: `reap_idle` unloads it
            raise ModelNotLoaded(
                f"Model {model_id}'s file was written over on disk since it was loaded, so it is being unloaded; "
                "load it again. (Replace a loaded model's file by renaming a new one over it, never in place.)",
                state=known.state.value,
            )
        with self._lock:
            if self.closing:
                raise _shutting_down()
            record = self._servable_locked(model_id)
            if record.in_flight:
                if record.queued >= self._max_queue:
                    retry = max(1, min(60, math.ceil(record.generation_seconds * (record.queued + 1))))
                    raise ModelBusy(
                        f"Model {model_id} is busy: one generation is running and {record.queued} are queued, "
                        f"the most this node queues per model. Retry after {retry}s, or use another replica.",
                        retry_after=retry,
                    )
                record.queued += 1
                self._usage_changed_locked()
                try:
                    while record.in_flight and record.state is ModelState.LOADED:
                        if cancelled is not None and cancelled.is_set():
                            raise GenerationCancelled(model_id)
                        if self.closing:
                            raise _shutting_down()
                        self._changed.wait()
                finally:
                    record.queued -= 1
                    self._usage_changed_locked()
                if cancelled is not None and cancelled.is_set():
                    raise GenerationCancelled(model_id)
                if self.closing:  # the running one ended because the node is stopping: not this one's turn
                    raise _shutting_down()
                record = self._servable_locked(model_id, record)
            record.in_flight += 1
            record.last_used = self._clock()
            self._usage_changed_locked()
            lease = Lease(self, record)
            record.leases.add(lease)
            return lease

    def try_acquire(self, model_id: str) -> Lease | None:
        """The model's lease if it is loaded and idle right now, else None (never waits, never queues)."""
        with self._lock:
            record = self._records.get(model_id)
            if record is None or record.state is not ModelState.LOADED or record.busy:
                return None
            record.in_flight += 1
            # Not announced as usage (a health check every few seconds is not a use): an update that happens to
            # see it running marks the next one due, which sees it done.
            lease = Lease(self, record, quiet=True)
            record.leases.add(lease)
            return lease

    def _servable_locked(self, model_id: str, expected: ModelRecord | None = None) -> ModelRecord:
        record = self._records.get(model_id)
        if record is None or (expected is not None and record is not expected):
            raise ModelNotLoaded(f"Model {model_id} is not loaded on this node.")
        if record.state is not ModelState.LOADED:
            doing = {ModelState.LOADING: "still loading", ModelState.UNLOADING: "being unloaded"}
            raise ModelNotLoaded(
                f"Model {model_id} is {doing.get(record.state, 'not loaded')} on this node.", state=record.state.value
            )
        return record

    def wake(self) -> None:
        """Wake queued generations, so that one whose `cancelled` event was set gives up its place."""
        with self._lock:
            self._changed.notify_all()

    def _release(self, lease: Lease, record: ModelRecord) -> None:
        with self._lock:
            self._release_locked(lease, record)

    def _release_locked(self, lease: Lease, record: ModelRecord) -> None:
        record.in_flight -= 1
        record.leases.discard(lease)
        record.tokens_generated += lease.tokens
        if not lease.quiet:
            self._usage_changed_locked()
        now = self._clock()
        if lease.tokens or lease.failed:  # a health check is not a use
            record.last_used = now
            took = time.monotonic() - lease.started
            avg = record.generation_seconds
            record.generation_seconds = took if not avg else 0.8 * avg + 0.2 * took
        if record.state is ModelState.LOADED:
            # A generation that ran is the best health check there is; a failed one marks the model unwell.
            record.healthy = not lease.failed if (lease.tokens or lease.failed) else record.healthy
        self._changed.notify_all()

    def _rewritten(self) -> set[str]:
        """The loaded models whose file was written over in place; the files are looked at outside the lock, so
        that a slow filesystem holds up no request."""
        with self._lock:
            loaded = [r for r in self._records.values() if r.state is ModelState.LOADED]
        return {r.model_id for r in loaded if r.rewritten}

    def reap_idle(self) -> list[str]:
        """Unload every model unused for longer than its keep-alive (reason `idle`), and every idle model whose
        file was written over in place (reason `file-changed`, before anything reads its pages); returns their
        ids."""
        rewritten_ids = self._rewritten()
        now = self._clock()
        with self._lock:
            loaded = [r for r in self._records.values() if r.state is ModelState.LOADED and not r.busy]
            idle = [r for r in loaded if r.keep_alive is not None and now - r.last_used >= r.keep_alive]
            idle_ids = {r.model_id for r in idle}
            rewritten = [r for r in loaded if r.model_id in rewritten_ids and r.model_id not in idle_ids]
            futures = [(r, self._begin_unload_locked(r, UnloadReason.IDLE)) for r in idle]
            futures += [(r, self._begin_unload_locked(r, UnloadReason.FILE_CHANGED)) for r in rewritten]
        for record, future in futures:
            if record.unload_reason is UnloadReason.FILE_CHANGED:
                log.warning("unloading %s: its file %s was written over while loaded", record.model_id, record.path)
            else:
                log.info(
                    "unloading %s: unused for %.0fs (keep-alive %.0fs)",
                    record.model_id,
                    now - record.last_used,
                    record.keep_alive or 0,
                )
            self._unload_quietly(record, future)
        return [r.model_id for r, _ in futures]

    def unload_all(self, *, deadline: float | None = None) -> tuple[list[str], list[tuple[str, ModelfleetError]]]:
        """Unload every model; failed records are cleared too. Returns (unloaded ids, failures)."""
        with self._lock:
            ids = [r.model_id for r in self._records.values() if r.state is not ModelState.FAILED]
            for model_id in [r.model_id for r in self._records.values() if r.state is ModelState.FAILED]:
                del self._records[model_id]
        unloaded: list[str] = []
        failures: list[tuple[str, ModelfleetError]] = []
        for model_id in ids:
            try:
                self.unload(model_id, deadline=deadline)
                unloaded.append(model_id)
            except ModelNotLoaded:
                continue  # unloaded meanwhile by someone else, or its load failed
            except ModelfleetError as exc:
                failures.append((model_id, exc))
        return unloaded, failures

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return self._models_locked()

    def _models_locked(self) -> list[ModelInfo]:
        return [r.info() for r in sorted(self._records.values(), key=lambda r: r.model_id)]

    def with_models(self, action: Callable[[list[ModelInfo]], None]) -> None:
        """Call `action` with the models now, under the registry lock: ordered with the change hook's calls, so
        what `action` queues stands between the changes before and after it. It must not block."""
        with self._lock:
            action(self._models_locked())

    def loading(self, model_id: str, *, pin: bool = False) -> "Future[LoadOutcome] | None":
        """The in-flight load of `model_id`, to wait on without calling `load`; None if it is not loading.
        A `pin` is applied to the model as it would be by joining through `load`."""
        with self._lock:
            record = self._records.get(model_id)
            if record is not None and record.state is ModelState.LOADING:
                record.pinned = record.pinned or pin
                return record.pending
            return None

    def get(self, model_id: str) -> ModelInfo | None:
        with self._lock:
            record = self._records.get(model_id)
            return record.info() if record else None

    def check_health(self, *, fresh_within: float = 0.0) -> None:
        """Ask the backend about every idle loaded model, under its lease (never beside a generation); `healthy`
        reflects the last answer. A busy model is skipped, and so is one that generated within `fresh_within`
        seconds: its generations say whether it answers."""
        rewritten = self._rewritten()  # their pages may be gone: the heartbeat unloads them, nothing reads them
        now = self._clock()
        with self._lock:
            ids = [
                r.model_id
                for r in self._records.values()
                if r.state is ModelState.LOADED
                and not (r.healthy and now - r.last_used < fresh_within)
                and r.model_id not in rewritten
            ]
        for model_id in ids:
            lease = self.try_acquire(model_id)
            if lease is None:
                continue
            try:
                ok = lease.model is not None and self._loader.check(lease.model)
                with self._lock:
                    record = lease._record
                    if record.state is ModelState.LOADED and record.healthy != ok:
                        record.healthy = ok
                        self._emit_locked("model-checked", record)
            finally:
                lease.release()

    def stats(self) -> dict[str, Any]:
        """The heartbeat's figures, read under one lock so they agree with each other."""
        with self._lock:
            states = Counter(r.state.value for r in self._records.values())
            return {
                "modelsLoaded": states[ModelState.LOADED.value],
                "modelStates": {state.value: states[state.value] for state in ModelState},
                "memoryUsedBytes": self._used_locked(),
                "memoryBudgetBytes": self._budget or 0,
            }

    def memory(self) -> MemoryInfo:
        """The budget, what models hold of it (reservations included), and what eviction could reclaim."""
        with self._lock:
            used = self._used_locked()
            evictable = sum(r.reserved_bytes for r in self._evictable_locked())
            free = None if self._budget is None else max(self._budget - used, 0)
            return MemoryInfo(budget_bytes=self._budget, used_bytes=used, free_bytes=free, evictable_bytes=evictable)

    def snapshot(self) -> list[ModelRecord]:
        """Copies of the records (without handles), for placement and eviction decisions."""
        with self._lock:
            return [replace(r, handle=None, pending=None) for r in self._records.values()]

    def _usage_changed_locked(self) -> None:
        if self._on_usage is not None:
            self._on_usage()

    def _emit_locked(self, kind: str, record: ModelRecord) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(kind, record.info(), self._models_locked())
        except Exception:
            log.exception("pool event %s for %s could not be queued", kind, record.model_id)


def _margin(deadline: float | None) -> float | None:
    """When work for a caller with `deadline` must end, so that its answer still makes it back."""
    return None if deadline is None else deadline - DRAIN_MARGIN


class GenerationCancelled(Exception):
    """A queued generation's caller gave up before its turn came (never shown to anyone: the caller left)."""


def _wait_quietly(future: "Future[Any]") -> None:
    # Whatever the outcome, the caller re-reads the record's state and decides.
    with contextlib.suppress(BaseException):
        future.result()
