"""The node-addressed API: `/api/v1/nodes[/{fingerprint}[/models[/load|/unload|/unload-all]]]`.

Each job route runs one operation of `broker.operations` on one node (`api.openapi.job_route`): the operation's
scope guards it, its result model is the answer, its errors and the API's own are the documented failures. Job
routes find their node with `NodeDirectory.live` (one GET of its alive key), the node views with a full read.
"""

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import Directory, Jobs
from api.jobs import JobClient
from api.openapi import guarded, job_route
from api.schemas import NodeLoadRequest, NodeUnloadRequest
from broker import errors as e
from broker.answers import NodeList
from broker.operations import CATALOG, LIST, LOAD, UNLOAD, UNLOAD_ALL, Scope
from broker.registry import NodeDirectory
from broker.schemas import LoadResult, ModelList, NodeCatalog, NodeInfo, UnloadAllResult, UnloadResult

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])

Fingerprint = Annotated[str, Path(description="The node's fingerprint, as `GET /api/v1/nodes` lists it.")]


@router.get("", response_model=NodeList, summary="List the nodes", **guarded(Scope.READ))
async def list_nodes(directory: Directory) -> NodeList:
    """Every node that ever registered, online or not, with its last heartbeat's figures."""
    return NodeList(data=await directory.all())


@router.get(
    "/{fingerprint}",
    response_model=NodeInfo,
    summary="Show one node",
    **guarded(Scope.READ, e.InvalidRequest, e.NodeNotFound, e.NodeUnavailable),
)
async def get_node(fingerprint: Fingerprint, directory: Directory) -> NodeInfo:
    """One node's registration and last heartbeat."""
    return await directory.get(fingerprint)


MODELS = "/{fingerprint}/models"
"""A node's models, under the router's prefix (`api.fastlane` answers its GET beneath FastAPI)."""


@router.get(MODELS, summary="List a node's models", **job_route(LIST))
async def list_models(fingerprint: Fingerprint, directory: Directory, jobs: Jobs) -> ModelList:
    """The models on one node, in every state (`loading`, `loaded`, `unloading`, `failed`)."""
    return await node_models(fingerprint, directory, jobs)


async def node_models(fingerprint: str, directory: NodeDirectory, jobs: JobClient) -> ModelList:
    """The list job on the node, as `list_models` and `api.fastlane` both run it."""
    return await jobs.run(await directory.live(fingerprint), LIST)


@router.post("/{fingerprint}/models/load", summary="Load a model on a node", **job_route(LOAD))
async def load_model(fingerprint: Fingerprint, body: NodeLoadRequest, directory: Directory, jobs: Jobs) -> LoadResult:
    """Load a model file from the node's models directory; answers once it is loaded (or already was).

    Waits up to the load timeout (600 s by default). A load of a model that is loading joins that load.
    """
    node = await directory.live(fingerprint)
    return await jobs.run(
        node,
        LOAD,
        model_id=body.model_id,
        model_path=body.model_path,
        context_length=body.context_length,
        gpu_layers=body.gpu_layers,
        keep_alive=body.keep_alive,
        backend=body.backend,
    )


@router.get("/{fingerprint}/catalog", summary="Show what a node can load", **job_route(CATALOG))
async def node_catalog(fingerprint: Fingerprint, directory: Directory, jobs: Jobs) -> NodeCatalog:
    """What the node can load (each file with its memory estimate, or why it cannot be loaded), what it holds,
    and its memory budget."""
    return await jobs.run(await directory.live(fingerprint), CATALOG)


@router.post("/{fingerprint}/models/unload", summary="Unload a model from a node", **job_route(UNLOAD))
async def unload_model(
    fingerprint: Fingerprint, body: NodeUnloadRequest, directory: Directory, jobs: Jobs
) -> UnloadResult:
    """Unload one model and free its memory."""
    return await jobs.run(await directory.live(fingerprint), UNLOAD, model_id=body.model_id)


@router.post("/{fingerprint}/models/unload-all", summary="Unload every model from a node", **job_route(UNLOAD_ALL))
async def unload_all(fingerprint: Fingerprint, directory: Directory, jobs: Jobs) -> UnloadAllResult:
    """Unload every model on one node; a model that could not be unloaded is listed in `errors`."""
    return await jobs.run(await directory.live(fingerprint), UNLOAD_ALL)
