"""`GET /healthz`: no auth, no secrets; says whether Redis answers."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> Any:
    try:
        await request.app.state.redis.ping()
    except (RedisError, OSError):
        return JSONResponse({"status": "degraded", "redis": "unreachable"}, status_code=503)
    return {"status": "ok", "redis": "reachable"}
