"""The pool API, as model-loading.txt defines it: `/v1/models[/load|/unload|/unload-all|/status]`.

The whole fleet is one region: loads are placed by `api.placement`, unloads reach every node that holds the
model. Bodies and answers are snake_case, as in that document (the node-addressed API speaks camelCase).
Each route's scope is that of the operation it sends to the nodes (`broker.operations`).
"""

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.convertors import Convertor, register_url_convertor

from api.deps import Fleet
from api.errors import POOL_ACTIONS
from api.openapi import JOB_ERRORS, guarded
from api.schemas import PoolLoadRequest, PoolUnloadRequest
from broker import errors as e
from broker.answers import (
    PoolLoadResult,
    PoolModel,
    PoolModelList,
    PoolStatus,
    PoolUnloadAllResult,
    PoolUnloadResult,
)
from broker.operations import CATALOG, LIST, LOAD, UNLOAD, UNLOAD_ALL

router = APIRouter(prefix="/v1/models", tags=["pool"])


@router.get("", response_model=PoolModelList, summary="List the fleet's models", **guarded(CATALOG.scope))
async def list_models(pool: Fleet) -> PoolModelList:
    """Every model file in the fleet, with the nodes that have it and the nodes where it is loaded.

    Online nodes that did not answer are listed in `errors`; offline nodes are left out.
    """
    return await pool.models()


@router.get("/status", response_model=PoolStatus, summary="Show each model's state", **guarded(CATALOG.scope))
async def model_status(pool: Fleet) -> PoolStatus:
    """Which models are loaded, each model's state across the fleet, and every node's models and memory."""
    return await pool.status()


@router.post(
    "/load",
    response_model=PoolLoadResult,
    summary="Load a model where it fits",
    **guarded(LOAD.scope, *JOB_ERRORS, *LOAD.errors),
)
async def load_model(body: PoolLoadRequest, pool: Fleet) -> PoolLoadResult:
    """Load a model on the node that has its file and the most free memory (or on `node`).

    A node that has filled up since it was surveyed is skipped for the next candidate. With `evict`, least
    recently used unpinned models make room; without it, a model that fits nowhere is refused with 409.
    """
    return await pool.load(body)


@router.post(
    "/unload",
    response_model=PoolUnloadResult,
    summary="Unload a model everywhere",
    **guarded(UNLOAD.scope, *JOB_ERRORS, *UNLOAD.errors, *LIST.errors),
)
async def unload_model(body: PoolUnloadRequest, pool: Fleet) -> PoolUnloadResult:
    """Unload a model from every online node where it is loaded; `partial` if some of them failed."""
    return await pool.unload(body.model_name)


@router.post(
    "/unload-all",
    response_model=PoolUnloadAllResult,
    summary="Unload every model everywhere",
    **guarded(UNLOAD_ALL.scope),
)
async def unload_all(pool: Fleet) -> PoolUnloadAllResult:
    """Unload every model on every node; `partial` if a live node failed (its failures are in `errors`)."""
    return await pool.unload_all()


ModelId = Annotated[str, Path(description="A model's id, as `GET /v1/models` lists it (it may hold slashes).")]


class _ModelPath(Convertor[str]):
    """A model id in a path: one character or more, slashes included (Starlette's `path` also takes none, and
    `/v1/models/` then was a model called "" instead of a redirect to the listing)."""

    regex = ".+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_path", _ModelPath())


@router.get(
    "/{model_id:model_path}",
    response_model=PoolModel,
    summary="Show one model",
    **guarded(CATALOG.scope, e.InvalidRequest, e.ModelFileNotFound, openai=True),
)
async def get_model(model_id: ModelId, pool: Fleet) -> PoolModel:
    """One model's entry of `GET /v1/models` (what openai-python's `models.retrieve` reads); errors in OpenAI's
    shape. `status` is the pool's own route, not a model id here. A GET of `load`, `unload` or `unload-all` asks
    for a model of that name; when there is none, the 404 names the pool's POST route."""
    for entry in (await pool.models()).data:
        if entry.id == model_id:
            return entry
    path = f"{router.prefix}/{model_id}"
    route = f" (POST {path} is the pool's route of that name)" if path in POOL_ACTIONS else ""
    raise e.ModelFileNotFound(
        f"No online node has a model {model_id!r}{route}; GET /v1/models lists the fleet's models.", model=model_id
    )
