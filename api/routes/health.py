"""`GET /healthz`: no auth, no secrets; says whether Redis answers."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.errors import documented
from broker.answers import Health

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Check the API's health",
    responses={
        **documented(),
        503: {"model": Health, "description": "Redis, which carries every job, cannot be reached."},
    },
)
async def healthz(request: Request) -> Any:
    """Whether this API process reaches Redis. Needs no key, and says nothing secret: for load balancers."""
    try:
        await request.app.state.redis.ping()
    except (RedisError, OSError):
        degraded = Health(status="degraded", redis="unreachable")
        return JSONResponse(degraded.model_dump(mode="json"), status_code=503)
    return Health(status="ok", redis="reachable")
