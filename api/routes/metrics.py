"""`GET /metrics`: Prometheus exposition of the fleet's gauges and the API's job counters (read scope)."""

from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import AppMetrics, Directory, Proxy
from api.openapi import guarded
from broker import errors as e
from broker.operations import Scope

router = APIRouter(tags=["operations"])

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_EXPOSITION = {"schema": {"type": "string"}}


@router.get(
    "/metrics",
    response_class=Response,
    summary="Scrape the fleet's metrics",
    **guarded(
        Scope.READ,
        e.InvalidRequest,
        openapi_extra={"responses": {"200": {"content": {TEXT: _EXPOSITION, OPENMETRICS: _EXPOSITION}}}},
    ),
)
async def metrics(
    directory: Directory,
    metrics: AppMetrics,
    proxy: Proxy,
    accept: Annotated[str | None, Header(description="`application/openmetrics-text` for OpenMetrics.")] = None,
) -> Response:
    """Nodes online, models by state and memory per node, and the API's jobs by operation and outcome, in
    Prometheus' text format (or OpenMetrics, when the scraper asks for it)."""
    nodes = await directory.all()
    in_flight = await proxy.inflight.counts([n.fingerprint for n in nodes if n.online])
    body, content_type = metrics.render(nodes, accept, in_flight)
    return Response(body, media_type=content_type)
