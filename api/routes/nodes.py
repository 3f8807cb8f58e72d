"""The node-addressed API: `/api/v1/nodes[/{fingerprint}[/models[/load|/unload|/unload-all]]]`."""

from typing import Any

from fastapi import APIRouter

from api.deps import Directory, Jobs, Operator, Reader, Settings
from api.schemas import NodeLoadRequest, NodeUnloadRequest
from broker import keys
from broker.schemas import NodeCatalog

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])


@router.get("")
async def list_nodes(_: Reader, directory: Directory) -> dict[str, Any]:
    """Every registered node, online or not."""
    return {"data": [node.wire() for node in await directory.all()]}


@router.get("/{fingerprint}")
async def get_node(fingerprint: str, _: Reader, directory: Directory) -> dict[str, Any]:
    return (await directory.get(fingerprint)).wire()


@router.get("/{fingerprint}/models")
async def list_models(fingerprint: str, _: Reader, directory: Directory, jobs: Jobs, settings: Settings) -> Any:
    node = await directory.get(fingerprint)
    return await jobs.run(node, keys.TASK_LIST, {}, settings.list_timeout)


@router.get("/{fingerprint}/catalog", response_model=NodeCatalog)
async def node_catalog(fingerprint: str, _: Reader, directory: Directory, jobs: Jobs, settings: Settings) -> Any:
    """What the node can load (each file with its memory estimate), what it holds, and its memory budget."""
    node = await directory.get(fingerprint)
    return await jobs.run(node, keys.TASK_CATALOG, {}, settings.list_timeout)


@router.post("/{fingerprint}/models/load")
async def load_model(
    fingerprint: str, body: NodeLoadRequest, _: Operator, directory: Directory, jobs: Jobs, settings: Settings
) -> Any:
    node = await directory.get(fingerprint)
    fields = {
        "model_id": body.modelId,
        "model_path": body.modelPath,
        "context_length": body.contextLength,
        "gpu_layers": body.gpuLayers,
        "keep_alive": body.keepAlive,
        "backend": body.backend,
    }
    return await jobs.run(node, keys.TASK_LOAD, fields, settings.load_timeout)


@router.post("/{fingerprint}/models/unload")
async def unload_model(
    fingerprint: str, body: NodeUnloadRequest, _: Operator, directory: Directory, jobs: Jobs, settings: Settings
) -> Any:
    node = await directory.get(fingerprint)
    return await jobs.run(node, keys.TASK_UNLOAD, {"model_id": body.modelId}, settings.unload_timeout)


@router.post("/{fingerprint}/models/unload-all")
async def unload_all(fingerprint: str, _: Operator, directory: Directory, jobs: Jobs, settings: Settings) -> Any:
    node = await directory.get(fingerprint)
    return await jobs.run(node, keys.TASK_UNLOAD_ALL, {}, settings.unload_timeout)
