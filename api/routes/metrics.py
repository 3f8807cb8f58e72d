"""`GET /metrics`: Prometheus exposition of the fleet's gauges and the API's job counters (read scope)."""

from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import AppMetrics, Directory, Reader

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(
    _: Reader, directory: Directory, metrics: AppMetrics, accept: Annotated[str | None, Header()] = None
) -> Response:
    nodes = await directory.all()
    body, content_type = metrics.render(nodes, accept)
    return Response(body, media_type=content_type)
