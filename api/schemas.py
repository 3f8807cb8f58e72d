"""Request bodies of the REST API. Answers are `broker` models: a node's records (`broker.schemas`) on the
node-addressed API, `broker.answers` on the pool API.

The node-addressed bodies are camelCase, as remote-model-control.txt defines them, and accept only those names.
Their limits are the job's own (`broker.schemas` types), so a body the API accepts is a job a node accepts.
"""

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.schemas import BackendName, ContextLength, GpuLayers, KeepAlive, ModelId, ModelPath, Schema


class _CamelBody(Schema):
    model_config = ConfigDict(validate_by_name=False, validate_by_alias=True)


class NodeLoadRequest(_CamelBody):
    """`POST /api/v1/nodes/{fingerprint}/models/load`, as remote-model-control.txt defines it."""

    model_id: ModelId
    model_path: ModelPath | None = None
    """A path inside the node's models directory; by default the file named after the model id."""
    context_length: ContextLength | None = None
    gpu_layers: GpuLayers | None = None
    """Layers to offload to the GPU (-1: all)."""
    keep_alive: KeepAlive | None = None
    """Seconds the model may stay unused before it unloads itself (0: never; absent: the node's default)."""
    backend: BackendName | None = None
    """"ctransformers" or "llama-cpp"; default: the node's choice (per file from its header with `auto`)."""


class NodeUnloadRequest(_CamelBody):
    """`POST /api/v1/nodes/{fingerprint}/models/unload`."""

    model_id: ModelId


class PoolLoadRequest(BaseModel):
    """`POST /v1/models/load`: model-loading.txt's body, plus where and how to make room."""

    model_config = ConfigDict(extra="forbid")

    model_name: ModelId
    force_reload: StrictBool = False
    """Reload the model afresh even where it is loaded."""
    node: str | None = Field(default=None, min_length=1, max_length=64)
    """A fingerprint: load there instead of where placement would."""
    evict: StrictBool = False
    """If the model fits nowhere, unload least recently used, unpinned models to make room."""
    pin: StrictBool = False
    """Never evict this model (it can still be unloaded explicitly)."""
    keep_alive: KeepAlive | None = None
    """Seconds the model may stay unused before it unloads itself (0: never; absent: the node's default)."""
    backend: BackendName | None = None
    """Load with this backend; default: each node's choice."""


class PoolUnloadRequest(BaseModel):
    """`POST /v1/models/unload`, as model-loading.txt defines it."""

    model_config = ConfigDict(extra="forbid")

    model_name: ModelId
