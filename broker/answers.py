"""What the REST API answers besides a node's own records: the pool API's records and the head's own.

The node-addressed API (`/api/v1/nodes/...`) answers the records nodes send (`broker.schemas`, camelCase). The
pool API (`/v1/models...`) answers the snake_case records below, in the shapes model-loading.txt shows. The
API builds its answers from these models and the Python client reads them back into the same models (leniently,
so that a client keeps working against a newer API that adds fields).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.schemas import MemoryInfo, ModelInfo, ModelState, NodeInfo, Schema


class Answer(BaseModel):
    """Base of the pool API's answers: frozen, snake_case, no field beyond those declared."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorBody(Answer):
    """Every error the API answers: a sentence a person can act on, a stable code, and details by code."""

    success: Literal[False] = False
    error: str
    """What went wrong and what to do about it."""
    code: str
    """Stable: one of the codes of `broker.errors` (`model_file_not_found`, `node_offline`, ...)."""
    details: dict[str, Any] = Field(default_factory=dict)


def _absent_if_none(value: object) -> bool:
    return value is None


class Health(Answer):
    """`GET /healthz`: whether the API reaches Redis. A degraded API answers this too (with HTTP 503)."""

    status: Literal["ok", "degraded"]
    redis: str
    """`reachable` or `unreachable`."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class NodeList(Schema):
    """`GET /api/v1/nodes`: every registered node, online or not."""

    data: list[NodeInfo]


class NodeFailure(Answer):
    """One entry of a pool answer's `errors`: which node (and model) failed, and how."""

    node: str
    node_name: str
    model: str | None = Field(default=None, exclude_if=_absent_if_none)
    """Absent when the failure concerns the node rather than one model."""
    code: str
    error: str


class PoolModel(Answer):
    """A model somewhere in the fleet, with the nodes that have its file and those where it is loaded."""

    id: str
    object: Literal["model"] = "model"
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
    backends: list[str] = Field(default_factory=list)
    """The backends the nodes that have its file would load it with ("ctransformers", "llama-cpp")."""


class PoolModelList(Answer):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[PoolModel]
    errors: list[NodeFailure] = Field(default_factory=list)
    """Online nodes that did not answer."""


class PoolLoadResult(Answer):
    """`POST /v1/models/load`."""

    status: Literal["success"] = "success"
    model: str
    force_reload: bool
    message: str
    node: str
    node_name: str
    already_loaded: bool
    evicted: list[str] = Field(default_factory=list)


class PoolUnloadResult(Answer):
    """`POST /v1/models/unload`: the nodes it was unloaded from; "partial" if some holder failed."""

    status: Literal["success", "partial"]
    model: str
    message: str
    nodes: list[str]
    errors: list[NodeFailure] = Field(default_factory=list)


class PoolUnloadAllResult(Answer):
    """`POST /v1/models/unload-all`: `status` is "partial" if a live node failed."""

    status: Literal["success", "partial"]
    unloaded_models: list[str]
    errors: list[NodeFailure] = Field(default_factory=list)
    total_unloaded: int
    nodes: dict[str, list[str]]
    """Per node fingerprint, the models unloaded there."""


class SnakeModelInfo(ModelInfo):
    """`ModelInfo` with snake_case field names, as the pool API shows it."""

    model_config = ConfigDict(alias_generator=lambda name: name)


class SnakeMemoryInfo(MemoryInfo):
    """`MemoryInfo` with snake_case field names, as the pool API shows it."""

    model_config = ConfigDict(alias_generator=lambda name: name)


class StatusError(Answer):
    """Why a node is in `GET /v1/models/status` without its models."""

    code: str
    error: str


class PoolNodeStatus(Answer):
    """One node in `GET /v1/models/status`: its models and memory, or why it did not answer."""

    name: str
    online: bool
    models_dir: str
    models: list[SnakeModelInfo] | None = Field(default=None, exclude_if=_absent_if_none)
    memory: SnakeMemoryInfo | None = Field(default=None, exclude_if=_absent_if_none)
    error: StatusError | None = Field(default=None, exclude_if=_absent_if_none)


class PoolStatus(Answer):
    """`GET /v1/models/status`."""

    loaded: list[str]
    loading_status: dict[str, ModelState]
    repository: str | None
    """The models directory every online node shares, else the first of them."""
    repositories: list[str]
    nodes: dict[str, PoolNodeStatus]
