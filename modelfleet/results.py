"""What the pool API (`/v1/models`) and `/healthz` answer, as typed records for the client.

The node-addressed API answers with `broker.schemas` records (NodeInfo, ModelInfo, LoadResult, ...), which the
client reuses as they are. The pool API answers snake_case dicts built in `api/pool.py`; these mirror them.
They ignore fields they do not know, so a client keeps working against a newer API.
"""

from pydantic import BaseModel, ConfigDict, Field

from broker.schemas import MemoryInfo, ModelInfo, ModelState


class Answer(BaseModel):
    """Base of the records below: frozen, and tolerant of fields a newer API adds."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Health(Answer):
    """`GET /healthz`: whether the API reaches Redis. A degraded API answers this too (with HTTP 503)."""

    status: str
    redis: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class NodeFailure(Answer):
    """One entry of a pool answer's `errors`: which node (and model) failed, and how."""

    node: str
    node_name: str
    model: str | None = None
    code: str
    error: str


class PoolModel(Answer):
    """A model file somewhere in the fleet, with the nodes that have it and those where it is loaded."""

    id: str
    object: str = "model"
    created: int = 0
    """When the model was first loaded in the fleet (UNIX seconds); 0 if it is not loaded."""
    owned_by: str = "modelfleet"
    state: ModelState
    nodes: list[str]
    loaded_on: list[str]
    size_bytes: int
    estimate_bytes: int | None = None
    problem: str | None = None
    """Why a node cannot load this file (not a GGUF, truncated): a load of it fails with this reason."""


class PoolModelList(Answer):
    """`GET /v1/models`."""

    object: str = "list"
    data: list[PoolModel]
    errors: list[NodeFailure] = Field(default_factory=list)


class PoolLoadResult(Answer):
    """`POST /v1/models/load`."""

    status: str
    model: str
    force_reload: bool
    message: str
    node: str
    node_name: str
    already_loaded: bool
    evicted: list[str] = Field(default_factory=list)


class PoolUnloadResult(Answer):
    """`POST /v1/models/unload`: the nodes it was unloaded from."""

    status: str
    model: str
    message: str
    nodes: list[str]
    errors: list[NodeFailure] = Field(default_factory=list)


class PoolUnloadAllResult(Answer):
    """`POST /v1/models/unload-all`: `status` is "partial" if a live node failed."""

    status: str
    unloaded_models: list[str]
    errors: list[NodeFailure] = Field(default_factory=list)
    total_unloaded: int
    nodes: dict[str, list[str]]
    """Per node fingerprint, the models unloaded there."""


class StatusError(Answer):
    code: str
    error: str


class PoolNodeStatus(Answer):
    """One node in `GET /v1/models/status`: its models and memory, or why it did not answer."""

    name: str
    online: bool
    models_dir: str
    models: list[ModelInfo] | None = None
    memory: MemoryInfo | None = None
    error: StatusError | None = None


class PoolStatus(Answer):
    """`GET /v1/models/status`."""

    loaded: list[str]
    loading_status: dict[str, ModelState]
    repository: str | None
    repositories: list[str]
    nodes: dict[str, PoolNodeStatus]
