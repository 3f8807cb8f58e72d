"""`GET /metrics`: Prometheus exposition of the fleet's gauges and the API's job counters (read scope)."""

from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import AppMetrics, Directory, Proxy, Reader

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(
    _: Reader,
    directory: Directory,
    metrics: AppMetrics,
    proxy: Proxy,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    nodes = await directory.all()
    in_flight = await proxy.inflight.counts([n.fingerprint for n in nodes if n.online])
    body, content_type = metrics.render(nodes, accept, in_flight)
    return Response(body, media_type=content_type)
