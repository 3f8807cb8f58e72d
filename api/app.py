"""`create_app(settings)`: the FastAPI head, its services built in the lifespan and kept on `app.state`."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api.deps import security_schemes
from api.errors import install_error_handlers
from api.events import EventRelay, OfflineWatcher
from api.fastlane import FastLane
from api.inflight import InFlight
from api.jobs import JobClient
from api.metrics import Metrics
from api.node_transport import NodeTransport
from api.openapi import DESCRIPTION, TAGS, document_body_limit
from api.pool import Pool
from api.proxy import NodeProxy, node_auth, node_timeout
from api.replies import ReplyWaiter
from api.routes import dashboard, events, health, inference, metrics, models, nodes, session
from api.routing import NodeView, Router
from api.schemas import PoolLoadRequest
from api.sender import TaskSender
from api.sessions import SessionStore
from api.settings import ApiSettings
from broker import __version__
from broker.auth import KeyRing
from broker.body_limit import BodyLimit
from broker.celery_app import make_celery
from broker.events import AsyncEventBus
from broker.registry import NodeDirectory
from broker.wrong_keys import WrongKeys

log = logging.getLogger("modelfleet.api")


def create_app(settings: ApiSettings, *, fast_lane: bool = True) -> FastAPI:
    """The head; `fast_lane=False` leaves every route to FastAPI (the tests compare the two)."""
    keyring = KeyRing(settings.operator_keys, settings.api_keys)
    if not len(keyring):
        raise ValueError("no API keys configured: set MODELFLEET_OPERATOR_KEYS (and MODELFLEET_API_KEYS)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking pool: a burst of requests queues for a connection; redis-py's default asyncio pool raises
        # MaxConnectionsError (answered as 503) as soon as 100 connections are in use.
        client = settings.redis_target.async_client(max_connections=100, timeout=20, health_check_interval=10)
        directory = NodeDirectory(client)
        waiter = ReplyWaiter(
            client,
            tick=settings.liveness_interval,
            registry_grace=max(settings.heartbeat_ttl, 2 * settings.heartbeat_interval),
        )
        celery = make_celery(settings)
        app.state.redis = client
        app.state.sessions = SessionStore(client, keyring, ttl=settings.session_ttl)
        app.state.directory = directory
        app.state.waiter = waiter
        sender = TaskSender(celery, client)
        app.state.jobs = JobClient(sender, directory, client, waiter, settings=settings, metrics=app.state.metrics)
        relay = EventRelay(
            client,
            directory,
            queue_size=settings.sse_queue_size,
            ping_interval=settings.sse_ping_interval,
            write_timeout=settings.sse_write_timeout,
        )
        watcher = OfflineWatcher(
            client, directory, AsyncEventBus(client, history=settings.events_history), tick=settings.liveness_interval
        )
        app.state.relay = relay
        app.state.metrics.watch_relay(relay)
        fleet = Pool(directory, app.state.jobs)

        async def load(model_id: str) -> object:
            return await fleet.load(PoolLoadRequest(model_name=model_id, evict=settings.on_demand_evict), serving=True)

        view = NodeView(directory)
        following = asyncio.create_task(view.follow(client), name="modelfleet-node-view-follow")
        router = Router(
            client, directory, view, load, on_demand=settings.load_on_demand, load_timeout=settings.load_timeout
        )
        inflight = InFlight(client, lease=settings.inflight_lease)
        transport = NodeTransport()
        app.state.proxy = NodeProxy(
            transport,
            node_timeout(settings),
            inflight,
            router,
            app.state.metrics.inference,
            node_auth(settings),
            liveness=waiter,
            cooldown=settings.inference_failure_cooldown,
        )
        app.state.metrics.watch_inference(router)
        await waiter.start()
        await relay.start()
        await watcher.start()
        await inflight.start()
        log.info("API ready; redis %s", settings.safe_redis_url)
        try:
            yield
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
            await inflight.stop()
            await transport.aclose()
            await watcher.stop()
            await relay.stop()
            await waiter.stop()
            sender.close()
            celery.close()
            await client.aclose()

    # Swagger UI and ReDoc from assets served by this process, never a CDN (see api.openapi).
    app = FastAPIOffline(
        title="modelfleet",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        static_url="/docs/assets",
        swagger_ui_parameters={"persistAuthorization": True},
    )
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # the routes declare their schemes by name (`api.deps.secured`)
            schema = default_openapi()
            schema.setdefault("components", {})["securitySchemes"] = security_schemes()
            document_body_limit(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.metrics = Metrics()
    counted = app.state.metrics.keys.labels
    app.state.wrong_keys = WrongKeys(
        settings.wrong_key_limit, settings.wrong_key_window, counted=lambda outcome: counted(outcome).inc()
    )
    install_error_handlers(app)
    events.quiet_cut_streams()
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(nodes.router)
    app.include_router(models.router)
    app.include_router(events.router)
    app.include_router(inference.router)
    app.include_router(session.router)
    dashboard.install(app)
    if fast_lane:
        app.add_middleware(FastLane)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # outermost: the lane reads bodies too
    return app
