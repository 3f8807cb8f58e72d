"""The pool API, as model-loading.txt defines it: `/v1/models[/load|/unload|/unload-all|/status]`.

The whole fleet is one region: loads are placed by `api.placement`, unloads reach every node that holds the
model. Bodies and answers are snake_case, as in that document (the node-addressed API speaks camelCase).
"""

from typing import Any

from fastapi import APIRouter

from api.deps import Fleet, Operator, Reader
from api.schemas import PoolLoadRequest, PoolUnloadRequest

router = APIRouter(prefix="/v1/models", tags=["pool"])


@router.get("")
async def list_models(_: Reader, pool: Fleet) -> dict[str, Any]:
    """Every model file in the fleet, with the nodes that have it and the nodes where it is loaded."""
    return await pool.models()


@router.get("/status")
async def model_status(_: Reader, pool: Fleet) -> dict[str, Any]:
    return await pool.status()


@router.post("/load")
async def load_model(body: PoolLoadRequest, _: Operator, pool: Fleet) -> dict[str, Any]:
    return await pool.load(body)


@router.post("/unload")
async def unload_model(body: PoolUnloadRequest, _: Operator, pool: Fleet) -> dict[str, Any]:
    return await pool.unload(body.model_name)


@router.post("/unload-all")
async def unload_all(_: Operator, pool: Fleet) -> dict[str, Any]:
    return await pool.unload_all()
