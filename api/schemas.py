"""Request bodies of the REST API (responses are the node's schemas from `broker.schemas`)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from broker.schemas import BackendName, ModelId


class NodeLoadRequest(BaseModel):
    """`POST /api/v1/nodes/{fingerprint}/models/load`, as remote-model-control.txt defines it."""

    model_config = ConfigDict(extra="forbid")

    modelId: ModelId
    modelPath: str | None = Field(default=None, min_length=1, max_length=4096)
    contextLength: int | None = Field(default=None, ge=1, le=1 << 20)
    gpuLayers: int | None = Field(default=None, ge=-1, le=10_000)
    keepAlive: float | None = Field(default=None, ge=0, le=365 * 86400)
    """Seconds the model may stay unused before it unloads itself (0: never; absent: the node's default)."""
    backend: BackendName | None = None
    """"ctransformers" or "llama-cpp"; default: the node's choice (per file from its header with `auto`)."""


class NodeUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modelId: ModelId


class PoolLoadRequest(BaseModel):
    """`POST /v1/models/load`: model-loading.txt's body, plus where and how to make room."""

    model_config = ConfigDict(extra="forbid")

    model_name: ModelId
    force_reload: bool = False
    node: str | None = Field(default=None, min_length=1, max_length=64)
    """A fingerprint: load there instead of where placement would."""
    evict: bool = False
    pin: bool = False
    keep_alive: float | None = Field(default=None, ge=0, le=365 * 86400)
    """Seconds the model may stay unused before it unloads itself (0: never; absent: the node's default)."""
    backend: BackendName | None = None
    """Load with this backend; default: each node's choice."""


class PoolUnloadRequest(BaseModel):
    """`POST /v1/models/unload`, as model-loading.txt defines it."""

    model_config = ConfigDict(extra="forbid")

    model_name: ModelId


class ErrorBody(BaseModel):
    """Every failure's answer (`api.errors`): a sentence a person can act on and a stable code."""

    success: bool = False
    error: str
    code: str
    details: dict[str, Any] = Field(default_factory=dict)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can fail with these statuses, for its OpenAPI schema."""
    return {status: {"model": ErrorBody} for status in statuses}
