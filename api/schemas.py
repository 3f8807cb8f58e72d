"""Request bodies of the REST API (responses are the node's schemas from `broker.schemas`)."""

from pydantic import BaseModel, ConfigDict, Field

from broker.schemas import ModelId


class NodeLoadRequest(BaseModel):
    """`POST /api/v1/nodes/{fingerprint}/models/load`, as remote-model-control.txt defines it."""

    model_config = ConfigDict(extra="forbid")

    modelId: ModelId
    modelPath: str | None = Field(default=None, min_length=1, max_length=4096)
    contextLength: int | None = Field(default=None, ge=1, le=1 << 20)
    gpuLayers: int | None = Field(default=None, ge=-1, le=10_000)


class NodeUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modelId: ModelId
