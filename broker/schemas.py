"""Messages that cross Redis: jobs (API -> node), replies (node -> API) and the records they carry.

All are frozen Pydantic models that forbid unknown fields and travel as JSON. Field names are snake_case in
Python and camelCase on the wire, because the REST contract speaks camelCase.
"""

import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from broker.errors import InvalidModelId

MAX_MODEL_ID = 128


class Schema(BaseModel):
    """Base of every wire model: frozen, strict about unknown fields, camelCase on the wire."""

    # Each field's docstring is its description in /openapi.json: what a client reads there is what the code says.
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


M = TypeVar("M", bound=BaseModel)


def read_lenient(cls: type[M], raw: bytes | str) -> M:
    """Validate what another process wrote, ignoring fields this version does not know, at any depth.

    We write with `extra="forbid"`; we read leniently, so that one newer node in a rolling upgrade cannot
    break every older API head that reads its registration, reply or events. Anything malformed (not JSON,
    not UTF-8, nested too deep, wrong types) raises pydantic.ValidationError, a ValueError, and nothing else.
    """
    return cls.model_validate_json(raw, extra="ignore")


MODEL_ID_PUNCTUATION = " ._-/+:@=,()[]~"
"""The only characters besides letters, digits and combining marks a model id may hold: each is safe in a URL
path segment (percent-encoded where needed), a Redis key, a log line and a terminal. Refused, among others: line
and paragraph separators (U+2028, U+2029, U+0085), every control and format character (bidi overrides,
zero-width), other spaces (U+00A0), quotes, `%`, `?`, `#`, `&`, `;`, `*`, `<>|`, `$` and backquotes."""


def check_model_id(value: str) -> str:
    """Refuse ids that are empty, too long, absolute, hold `..` or any character outside the safe set.

    Raises InvalidModelId, a ValueError-compatible error for Pydantic, with the reason.
    """
    reason = _model_id_problem(value)
    if reason:
        raise InvalidModelId(f"Invalid model id {value[:40]!r}: {reason}.")
    return value


def _model_id_problem(value: str) -> str | None:
    if not value or not value.strip():
        return "it is empty"
    if len(value) > MAX_MODEL_ID:
        return f"it is longer than {MAX_MODEL_ID} characters"
    if value.startswith(("/", "\\")):
        return "it must not start with a slash"
    if ".." in value:
        return "it must not contain '..'"
    if "\\" in value:
        return "it must not contain a backslash"
    if value != value.strip(" "):
        return "it must not start or end with a space"
    for ch in value:
        if not (unicodedata.category(ch)[0] in "LNM" or ch in MODEL_ID_PUNCTUATION):
            name = unicodedata.name(ch, "a control character")
            return (
                f"it contains U+{ord(ch):04X} ({name}), which is not allowed; a model id holds letters, digits "
                f"and {MODEL_ID_PUNCTUATION.strip()} and spaces"
            )
    return None


def _as_value_error(value: str) -> str:
    try:
        return check_model_id(value)
    except InvalidModelId as exc:
        raise ValueError(exc.message) from exc


ModelId = Annotated[str, AfterValidator(_as_value_error)]
BackendName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
"""A backend's name ("ctransformers", "llama-cpp"); which ones exist is the node's business, not the contract's."""


# The limits of a load's options, shared by the job and by every request model that carries them. Strict: a JSON
# `true` or `"12"` is refused, not read as 1 or 12 (a keepAlive of `true` would unload the model a second later).
# A JSON integer is still a number of seconds.
ModelPath = Annotated[str, Field(min_length=1, max_length=4096)]
ContextLength = Annotated[int, Field(ge=1, le=1 << 20, strict=True)]
GpuLayers = Annotated[int, Field(ge=-1, le=10_000, strict=True)]
KeepAlive = Annotated[float, Field(ge=0, le=365 * 86400, strict=True)]


class ModelState(StrEnum):
    """Where a model is in its life on one node."""

    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


class UnloadReason(StrEnum):
    """Why a model left memory (on `model-unloading` / `model-unloaded`)."""

    REQUESTED = "requested"
    """An operator's unload (or unload-all)."""
    EVICTED = "evicted"
    """Made room for another model's load."""
    IDLE = "idle"
    """Unused for longer than its keep-alive."""
    RELOADED = "reloaded"
    """Replaced by a fresh copy (`force_reload`)."""
    FILE_CHANGED = "file-changed"
    """Its file was written over in place while it was loaded (its mapped weights could no longer be read)."""
    NODE_RESTARTED = "node-restarted"
    """Held by a node process that is gone: announced by the node's next process, which starts with none."""


class Operation(StrEnum):
    """The name of an operation (`broker.operations` declares each one)."""

    LOAD = "load"
    UNLOAD = "unload"
    UNLOAD_ALL = "unload_all"
    LIST = "list"
    CATALOG = "catalog"


# Jobs: the one argument of each task (its Celery task id is the job id). `deadline` is an absolute UNIX time
# after which the job must not run, checked by the node on top of Celery's own `expires`.


class Job(Schema):
    deadline: float


class LoadJob(Job):
    model_id: ModelId
    model_path: ModelPath | None = None
    context_length: ContextLength | None = None
    gpu_layers: GpuLayers | None = None
    force_reload: bool = False
    """Reload a loaded model afresh (admitted as a new load; the old copy is dropped first)."""
    evict: bool = False
    """If the model does not fit, unload least recently used, unpinned, loaded models until it does."""
    pin: bool = False
    """Never evict this model (it can still be unloaded explicitly)."""
    keep_alive: KeepAlive | None = None
    """Seconds the model may stay unused before it unloads itself; 0 never. None: the node's default."""
    backend: BackendName | None = None
    """Load with this backend; None: the node's choice (its `--backend`, or per file with `auto`)."""


class UnloadJob(Job):
    model_id: ModelId


class UnloadAllJob(Job):
    pass


class ListJob(Job):
    pass


class CatalogJob(Job):
    pass


# What nodes answer.


class ModelInfo(Schema):
    """One model on one node, as listed."""

    id: str
    path: str
    endpoint: str | None = None
    healthy: bool
    """The model answered its last check (a one-token generation) or generation."""
    state: ModelState
    context_length: int | None = None
    gpu_layers: int | None = None
    loaded_at: datetime | None = None
    size_bytes: int
    error: str | None = None
    pinned: bool = False
    # How much the node's memory grew while this model loaded (None if another load overlapped it).
    measured_bytes: int | None = None
    in_flight: int = 0
    """Generations running now (at most one per model)."""
    queued: int = 0
    """Generations waiting for the one running to finish."""
    tokens_generated: int = 0
    """Tokens generated since the model was loaded."""
    last_used: datetime | None = None
    """When it last finished or started a generation (or was loaded): what LRU eviction and the idle TTL use."""
    keep_alive: float | None = None
    """Seconds unused after which it unloads itself; None: never."""
    unload_reason: UnloadReason | None = None
    """Why it is unloading or was unloaded."""
    backend: str | None = None
    """The backend that runs (or is loading) the model; None if no backend could take it."""
    checking: bool = False
    """Loaded, and its first check runs now (one token's time): `healthy` follows with `model-checked`. The head
    routes to a model once it is healthy; requests that come meanwhile wait for it."""


class LoadResult(Schema):
    success: Literal[True] = True
    model_id: str
    node: str
    state: ModelState
    load_seconds: float
    already_loaded: bool
    evicted: list[str] = Field(default_factory=list)


class UnloadResult(Schema):
    success: Literal[True] = True
    model_id: str
    node: str
    state: ModelState


class UnloadFailure(Schema):
    model_id: str
    code: str
    error: str


class UnloadAllResult(Schema):
    success: Literal[True] = True
    node: str
    unloaded: list[str]
    errors: list[UnloadFailure]


class ModelList(Schema):
    data: list[ModelInfo]


class ModelFile(Schema):
    """A model file in a node's models directory: its id is the relative path without `.gguf`."""

    id: str
    path: str
    size_bytes: int
    estimate_bytes: int | None
    """Memory a load with the default context takes (weights plus KV cache, for the backend that would load it),
    from the GGUF header; None when no load of it can happen (see `problem`)."""
    problem: str | None = None
    """Why this file cannot be loaded (not a GGUF, truncated, no backend here runs it): a load of it fails with
    this reason."""
    backend: str | None = None
    """The backend a load would use; None when none can (`problem` says why)."""


class MemoryInfo(Schema):
    """A node's memory budget and what its models hold of it. `None` budget: no limit."""

    budget_bytes: int | None
    used_bytes: int
    free_bytes: int | None
    evictable_bytes: int
    """Held by loaded, unpinned models: what a load with `evict` may reclaim."""


class NodeCatalog(Schema):
    """What a node can load and what it holds: the input of pool-wide placement."""

    node: str
    files: list[ModelFile]
    models: list[ModelInfo]
    memory: MemoryInfo


class ErrorInfo(Schema):
    code: str
    error: str
    details: dict[str, Any] = Field(default_factory=dict)


R = TypeVar("R", bound=BaseModel)


class Reply(Schema, Generic[R]):
    """A node's answer to one job: exactly one of `result` (the operation's result model) and `error` is set.

    Parametrized by the result model (`Reply[LoadResult]`); the waiting side reads the job id first
    (`ReplyHeader`) to know which operation, hence which model, the reply carries.
    """

    job_id: str
    node: str
    result: R | None = None
    error: ErrorInfo | None = None


class ReplyHeader(BaseModel):
    """Just the job id of a reply, read before the rest."""

    model_config = ConfigDict(alias_generator=to_camel, extra="ignore")

    job_id: str


class DashboardSession(Schema):
    """A dashboard session as Redis keeps it: which key signed it in (by id, never the key) and with what scope."""

    key_id: str = Field(min_length=1, max_length=64)
    scope: int = Field(ge=1)
    """`broker.auth.Scope`'s value."""
    created_at: datetime


class NodeInfo(Schema):
    """A node's registration and last heartbeat, as the API shows it."""

    fingerprint: str
    name: str
    hostname: str
    models_dir: str
    version: str
    boot_id: str
    pid: int
    started_at: datetime
    queue: str
    endpoint: str | None = None
    """The base URL of the node's OpenAI-compatible inference endpoint (None: it serves none)."""
    online: bool = False
    # Online and its Celery consumer is taking jobs (a node is online a moment before it consumes).
    consuming: bool = False
    last_heartbeat: datetime | None = None
    seconds_since_heartbeat: float | None = None
    models_loaded: int = 0
    model_states: dict[ModelState, int] = Field(default_factory=dict)
    """How many of the node's models are in each state, at its last heartbeat."""
    memory_used_bytes: int = 0
    memory_budget_bytes: int | None = None
    """None: the node reports no budget."""
    rss_bytes: int = 0
