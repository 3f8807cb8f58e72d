"""A running node: identity, registry claim, heartbeat thread, and the service its tasks call."""

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psutil
import redis

from broker import __version__, keys
from broker.auth import KeyRing
from broker.errors import ModelfleetError
from broker.events import EventBus
from broker.registry import LostNodeOwnership, NodeRegistrar
from broker.schemas import LoadJob, ModelFile, NodeInfo
from broker.wrong_keys import WrongKeys
from workers.events import NodeEvents
from workers.identity import fingerprint, load_or_create_node_key

if TYPE_CHECKING:
    from workers.inference.server import NodeServer
from workers.manager import ModelManager
from workers.outbox import ReplyOutbox
from workers.service import NodeService
from workers.settings import WorkerSettings, default_memory_budget

log = logging.getLogger(__name__)


class NodeRuntime:
    """Everything one worker process holds for its node, built once at start-up."""

    def __init__(
        self,
        settings: WorkerSettings,
        service: NodeService,
        registrar: NodeRegistrar,
        client: redis.Redis,
        events: NodeEvents,
        outbox: ReplyOutbox,
        server: "NodeServer | None" = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.service = service
        self.registrar = registrar
        self.events = events
        self.outbox = outbox
        self.redis = client
        self._beat_failed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._files_lock = threading.Lock()
        self._files_read = False
        """Whether the warm-up thread has read the directory once (the heartbeat publishes changes after that)."""
        self._files_written: list[ModelFile] | None = None
        """The files last published to the node's hash; None: none (yet, or Redis lost them)."""
        events.after_models = lambda: registrar.publish_memory(service.manager.memory())

    @property
    def fingerprint(self) -> str:
        return self.service.fingerprint

    @property
    def boot_id(self) -> str:
        return self.registrar.info.boot_id

    @property
    def queue(self) -> str:
        return keys.node_queue(self.fingerprint)

    def serve(self) -> None:
        """Start the inference endpoint (before registering: the endpoint a node advertises answers)."""
        if self.server is not None:
            self.server.start()
            log.info("inference endpoint %s (port %d)", self.registrar.info.endpoint, self.server.port)

    def start(self) -> None:
        """Claim the fingerprint (raises DuplicateNode), register, start beating, then preload models."""
        self.registrar.claim(holder_gone=_holder_gone)
        self.events.started()  # a new process holds no models: those of the previous one are announced gone
        self._beat()  # and announces this boot online
        self._thread = threading.Thread(target=self._heartbeat_loop, name="modelfleet-heartbeat", daemon=True)
        self._thread.start()
        # Reading a real model's GGUF header takes about a second: read them all now, in the background, so the
        # first catalog (which the pool API asks for under the list timeout) finds them cached.
        threading.Thread(target=self._warm_catalog, name="modelfleet-catalog", daemon=True).start()
        if self.settings.preload:
            threading.Thread(target=self._preload, name="modelfleet-preload", daemon=True).start()
        log.info("node %s (%s) registered; queue %s", self.fingerprint, self.settings.name, self.queue)

    def _preload(self) -> None:
        for model_id in self.settings.preload:
            try:
                job = LoadJob(deadline=time.time() + 3600, model_id=model_id)
                result = self.service.load(job)
                log.info("preloaded %s in %.2fs", model_id, result.load_seconds)
            except ModelfleetError as exc:
                log.error("could not preload %s: %s", model_id, exc.message)
            except Exception as exc:
                log.error("could not preload %s: %s", model_id, type(exc).__name__)

    def _warm_catalog(self) -> None:
        started = time.monotonic()
        try:
            files = self._publish_files(first=True)
        except Exception:
            log.exception("could not read the models directory %s", self.service.models_dir)
            return
        log.info("%d model files in %s, read in %.1fs", len(files), self.service.models_dir, time.monotonic() - started)

    def _publish_files(self, *, first: bool = False) -> list[ModelFile]:
        """Scan the models directory (only stats, once the headers are cached) and publish its files to the
        node's hash if they changed: what fleet status lists. Before the first full read, it is left to the
        warm-up thread (the API asks the node with a job meanwhile)."""
        with self._files_lock:
            if not (self._files_read or first):
                return []
            files = self.service.files()
            self._files_read = True
            if files != self._files_written:
                self.registrar.publish_files(files)
                self._files_written = files
            return files

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.service.manager.close()  # running streams end now with an error event, not cut at the grace
        if self.server is not None:
            self.server.stop()
        # node-offline (stopped) goes out before the alive key does: an API noticing the key gone first would
        # announce the stop as a lapsed heartbeat.
        self.events.stopped()
        self.events.close()
        self.outbox.close()
        try:
            self.registrar.release()
        except redis.RedisError as exc:
            log.warning("could not mark node offline on stop: %s", type(exc).__name__)
        log.info("node %s stopped", self.fingerprint)

    def _beat(self) -> None:
        stats = {**self.service.manager.stats(), "rssBytes": self._process.memory_info().rss}
        beat = self.registrar.beat(stats)
        if beat.reregistered:
            log.warning(
                "node %s's records were missing from Redis (flushed, restarted or failed over); registered again",
                self.fingerprint,
            )
        elif beat.retaken:
            log.warning("heartbeat had lapsed (stalled process?); node %s is online again", self.fingerprint)
        if beat.reregistered or self._beat_failed:
            # Redis may have lost replies it had taken: write back those whose callers may still wait.
            self.outbox.restore()
            with self._files_lock:  # and the files it showed
                self._files_written = None
        self._beat_failed = False
        self._publish_files()
        # Every beat, not only on a re-take: a re-announcement lost to a Redis error is made at the next one.
        if not self._stop.is_set():
            self.events.online("re-registered" if beat.reregistered else None)

    def _heartbeat_loop(self) -> None:
        """Beat, unload idle models and check health until stopped. Nothing but the loss of the node ends it: a
        thread that died of one bad beat (a symlink loop in the models directory did it) left the node offline
        for good while the process kept taking jobs, and a successor then ran beside it."""
        interval = self.settings.heartbeat_interval
        next_health = time.monotonic() + self.settings.health_interval
        while not self._stop.wait(interval):
            try:
                self._beat()
            except LostNodeOwnership as exc:
                log.error("%s", exc.message)
                os.kill(os.getpid(), 15)
                return
            except redis.RedisError as exc:
                self._beat_failed = True
                log.warning("heartbeat failed: %s; retrying", type(exc).__name__)
            except Exception:
                self._beat_failed = True
                log.exception("heartbeat failed; retrying")
            try:
                self.service.manager.reap_idle()
                if time.monotonic() >= next_health:
                    self.service.manager.check_health(fresh_within=self.settings.health_interval)
                    next_health = time.monotonic() + self.settings.health_interval
            except Exception:
                log.exception("unloading idle models or checking health failed; retrying")


def build_runtime(settings: WorkerSettings) -> NodeRuntime:
    """Wire a node from its settings: its backends (`--backend`) and a sync Redis client."""
    from workers.backends import build_backends
    from workers.inference.server import NodeServer, bind, create_node_app

    models_dir = settings.models_dir.resolve()
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models directory {settings.models_dir} does not exist")
    fp = fingerprint(load_or_create_node_key(settings.resolved_state_dir))
    client = settings.redis_target.client(health_check_interval=10)
    budget = int(settings.memory_budget) if settings.memory_budget is not None else default_memory_budget()
    backends = build_backends(settings)
    process = psutil.Process()
    node_tokens = [settings.node_token] if settings.node_token else []
    keyring = KeyRing(settings.operator_keys, [*settings.api_keys, *node_tokens])
    sock = None
    if settings.serve:
        if len(keyring):
            sock = bind(settings.serve_host, settings.serve_port)
        else:
            log.error(
                "no keys configured (MODELFLEET_API_KEYS, MODELFLEET_OPERATOR_KEYS or MODELFLEET_NODE_TOKEN): "
                "this node serves no inference endpoint, since every call to it needs a key"
            )
    endpoint = settings.endpoint(int(sock.getsockname()[1])) if sock is not None else None
    info = NodeInfo(
        fingerprint=fp,
        name=settings.name,
        hostname=socket.gethostname(),
        models_dir=str(models_dir),
        version=__version__,
        boot_id=uuid.uuid4().hex,
        pid=os.getpid(),
        started_at=datetime.now(UTC),
        queue=keys.node_queue(fp),
        endpoint=endpoint,
    )
    events = NodeEvents(EventBus(client, history=settings.events_history), info)
    outbox = ReplyOutbox(client, ttl=settings.reply_ttl)
    manager = ModelManager(
        backends,
        memory_budget=budget,
        memory_probe=(lambda: int(process.memory_info().rss)) if settings.measure_loads else None,
        on_change=events.model_changed,
        on_usage=events.usage_changed,
        max_queue=settings.max_queue,
        keep_alive=settings.keep_alive,
        endpoint=endpoint,
    )
    events.with_models = manager.with_models
    log.info("node %s: memory budget %d bytes, backends %s", settings.name, budget, backends.describe())
    service = NodeService(fingerprint=fp, models_dir=models_dir, manager=manager, plan=backends.plan)
    registrar = NodeRegistrar(client, info, interval=settings.heartbeat_interval, ttl=settings.heartbeat_ttl)
    server = None
    if sock is not None:
        server = NodeServer(
            create_node_app(
                manager,
                keyring,
                stream_interval=settings.stream_interval,
                max_body_bytes=settings.max_body_bytes,
                wrong_keys=WrongKeys(settings.wrong_key_limit, settings.wrong_key_window),
            ),
            sock,
        )
    return NodeRuntime(settings, service, registrar, client, events, outbox, server)


def _holder_gone(holder: NodeInfo) -> bool:
    """Whether the process registered as `holder` is certainly dead: it ran on this machine and its pid is gone,
    or now belongs to a process younger than it (this one, say: a container restarted keeps its pid 1). Then a
    restart takes the node over at once instead of waiting for the dead process's heartbeat to lapse."""
    if holder.hostname != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return True
    try:
        created = psutil.Process(holder.pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    return created > holder.started_at.timestamp() + 1
