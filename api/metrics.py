"""`GET /metrics`: the fleet and the API's jobs in Prometheus form, through `prometheus-client`.

Each app has its own `CollectorRegistry`, so several apps can live in one process (the tests build many).
Three kinds of series:

- job counts and durations, recorded by `JobClient.run` around every job it sends to a node:
  `modelfleet_jobs_total` and `modelfleet_job_duration_seconds`, labelled by `operation` (load, unload,
  unload_all, list, catalog) and `outcome` (`ok`, or the error's stable code);
- gauges read from the node registry at scrape time (`FleetCollector`): nodes registered and online, and per
  online node its models by state and its memory budget and use, as its last heartbeat reported them, and the
  inference requests in flight to it from every API process (`api.inflight`);
- inference (`InferenceMetrics`), recorded by the proxy: requests by model and outcome, time to first token and
  tokens per second per model, this API's requests in flight and waiting for a load on demand, and the nodes it
  left out of its routing after a failure.

A Prometheus collector is synchronous and the registry is read with async Redis calls, so the route reads the
directory first and hands the snapshot to the collector just before generating; both happen without an await
between them, so concurrent scrapes cannot see each other's snapshot.

No label carries user input: operations come from a fixed set, outcomes from the error tree's codes, nodes
from the registry their workers wrote, model ids only once a replica served the model.
"""

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from api.events import EventRelay
    from api.routing import Router

from broker import __version__
from broker.errors import ERRORS_BY_CODE, BrokerUnavailable, InternalError, ModelfleetError, NodeError
from broker.schemas import ModelState, NodeInfo

OK = "ok"
CANCELLED = "cancelled"
"""The caller went away (the request was cancelled) before the job finished."""

# From a list that answers in milliseconds to a load that takes minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class FleetCollector(Collector):
    """Gauges computed from the last node snapshot the metrics route gave it."""

    def __init__(self) -> None:
        self.nodes: list[NodeInfo] = []
        self.in_flight: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        nodes = self.nodes
        yield _gauge("nodes_registered", "Nodes that ever registered.", len(nodes))
        yield _gauge("nodes_online", "Nodes whose heartbeat is current.", sum(n.online for n in nodes))

        labels = ["node", "node_name"]
        up = GaugeMetricFamily("modelfleet_node_online", "1 if the node's heartbeat is current, else 0.", labels=labels)
        age = GaugeMetricFamily(
            "modelfleet_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat.", labels=labels
        )
        models = GaugeMetricFamily(
            "modelfleet_node_models", "Models on an online node, by state.", labels=[*labels, "state"]
        )
        budget = GaugeMetricFamily(
            "modelfleet_node_memory_budget_bytes", "Bytes an online node's models may take.", labels=labels
        )
        used = GaugeMetricFamily(
            "modelfleet_node_memory_used_bytes", "Bytes of the budget an online node's models hold.", labels=labels
        )
        rss = GaugeMetricFamily(
            "modelfleet_node_rss_bytes", "Resident memory of an online node's worker.", labels=labels
        )
        flight = GaugeMetricFamily(
            "modelfleet_node_inference_in_flight",
            "Inference requests the heads are proxying to an online node, counted across every API process.",
            labels=labels,
        )
        for node in nodes:
            ids = [node.fingerprint, node.name]
            up.add_metric(ids, 1 if node.online else 0)
            if node.seconds_since_heartbeat is not None:
                age.add_metric(ids, node.seconds_since_heartbeat)
            if not node.online:  # its last heartbeat describes a process that no longer holds anything
                continue
            for state in ModelState:
                models.add_metric([*ids, state.value], node.model_states.get(state, 0))
            if node.memory_budget_bytes is not None:
                budget.add_metric(ids, node.memory_budget_bytes)
            used.add_metric(ids, node.memory_used_bytes)
            rss.add_metric(ids, node.rss_bytes)
            flight.add_metric(ids, self.in_flight.get(node.fingerprint, 0))
        yield from (up, age, models, budget, used, rss, flight)

        info = InfoMetricFamily("modelfleet_api", "The API's version.")
        info.add_metric([], {"version": __version__})
        yield info


class RelayCollector(Collector):
    """SSE clients connected to this API process, and what its relay dropped and relayed."""

    def __init__(self, relay: "EventRelay") -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        yield _gauge("sse_clients", "Clients connected to this API's event stream.", self.relay.clients)
        yield CounterMetricFamily(
            "modelfleet_sse_clients_dropped",
            "SSE clients this API disconnected for falling too far behind or for no longer reading.",
            value=self.relay.dropped_total,
        )
        yield CounterMetricFamily(
            "modelfleet_sse_clients_stalled",
            "SSE clients this API disconnected because a write to them waited past MODELFLEET_SSE_WRITE_TIMEOUT.",
            value=self.relay.stalled_total,
        )
        yield CounterMetricFamily(
            "modelfleet_sse_events_relayed",
            "Pool events this API relayed to its SSE clients.",
            value=self.relay.relayed_total,
        )
        yield CounterMetricFamily(
            "modelfleet_sse_usage_relayed",
            "Usage updates (model-usage) this API relayed to its SSE clients.",
            value=self.relay.usage_relayed_total,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"modelfleet_{name}", documentation, value=value)


def outcome_of(exc: BaseException) -> str:
    """A job's outcome label for the error that ended it: its stable code, from a closed set."""
    if isinstance(exc, ModelfleetError):
        # A node may send a code this API does not know (a newer node); keep the label set closed.
        return exc.code if exc.code in ERRORS_BY_CODE else NodeError.code
    if isinstance(exc, RedisError):
        return BrokerUnavailable.code
    if isinstance(exc, Exception):
        return InternalError.code
    return CANCELLED


class Metrics:
    """One app's metrics: its registry, the job counter and histogram, and the fleet collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["operation", "outcome"]
        self.jobs = Counter(
            "modelfleet_jobs", "Jobs the API sent to nodes, by operation and outcome.", labels, registry=self.registry
        )
        self.job_seconds = Histogram(
            "modelfleet_job_duration_seconds",
            "Time from sending a job to its outcome, by operation and outcome.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.keys = Counter(
            "modelfleet_wrong_keys",
            "Keys this API process answered 401 (outcome wrong), or 429 unjudged because their address had sent too "
            "many wrong ones lately (outcome refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.fleet = FleetCollector()
        self.registry.register(self.fleet)
        self.inference = InferenceMetrics(self.registry)

    def watch_inference(self, router: "Router") -> None:
        """Expose the head's queue (requests waiting for a load on demand), read at scrape time."""
        self.inference.waiting.set_function(lambda: router.waiting)

    def watch_relay(self, relay: "EventRelay") -> None:
        """Expose the event relay's clients and totals, read at scrape time."""
        self.registry.register(RelayCollector(relay))

    @contextmanager
    def job(self, operation: str) -> Iterator[None]:
        """Count and time the job run inside the block, labelled with how it ended."""
        started = time.perf_counter()
        outcome = CANCELLED
        try:
            yield
            outcome = OK
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.jobs.labels(operation, outcome).inc()
            self.job_seconds.labels(operation, outcome).observe(time.perf_counter() - started)

    def render(
        self, nodes: list[NodeInfo], accept: str | None, in_flight: dict[str, int] | None = None
    ) -> tuple[bytes, str]:
        """The exposition for this snapshot of the fleet, in the format the scraper accepts, and its type."""
        encode, content_type = choose_encoder(accept or "")
        self.fleet.nodes = nodes
        self.fleet.in_flight = in_flight or {}
        return encode(self.registry), content_type


# Inference: from a token every few milliseconds to a long answer.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
NO_MODEL = ""
"""The model label of a request refused before a replica was found: user input never becomes a label."""


class InferenceMetrics:
    """The head's inference series. The model label is set only once a replica served the model, so it comes
    from the fleet's models, never from what a caller typed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "modelfleet_inference_requests",
            "Inference requests through the head, by model and outcome (ok, an error code, http_<status>).",
            ["model", "outcome"],
            registry=registry,
        )
        self.ttft = Histogram(
            "modelfleet_inference_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token leaving the head.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.rate = Histogram(
            "modelfleet_inference_tokens_per_second",
            "Completion tokens per second of each answer: for a stream, the tokens after the first over the time"
            " from the first to the last; otherwise, all of them over the whole request.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "modelfleet_inference_in_flight", "Requests this API is proxying now.", ["model"], registry=registry
        )
        self.waiting = Gauge(
            "modelfleet_inference_waiting",
            "Requests this API holds until their model is loaded on demand (its queue).",
            registry=registry,
        )
        self.ejections = Counter(
            "modelfleet_inference_ejections",
            "Times this API left a node out of its routing because it could not be reached, broke or went away"
            " (MODELFLEET_INFERENCE_FAILURE_COOLDOWN), by node fingerprint.",
            ["node"],
            registry=registry,
        )

    def refused(self, outcome: str) -> None:
        self.requests.labels(NO_MODEL, outcome).inc()

    def tally(self, model: str, started: float, *, stream: bool, chat: bool) -> "Tally":
        return Tally(self, model, started, stream, chat)


class Tally:
    """One answer's figures as it passes through: when its first token left, and how many tokens it had."""

    def __init__(self, metrics: InferenceMetrics, model: str, started: float, stream: bool, chat: bool) -> None:
        self._metrics = metrics
        # Events that carry no token: the closing one with the finish reason, and a chat stream's role first.
        self._overhead = 2 if chat else 1
        self._model = model
        self._started = started
        self._stream = stream
        self._first_at: float | None = None
        self._last_at = started
        self._events = 0
        self._tail = b""

    def first(self, chunk: bytes) -> None:
        self._first_at = time.perf_counter()
        if self._stream:
            self._metrics.ttft.labels(self._model).observe(self._first_at - self._started)
        self.chunk(chunk)

    def chunk(self, chunk: bytes) -> None:
        # Cheap on the hot path: count event starts, keep only the tail, where a usage figure would be.
        self._last_at = time.perf_counter()
        self._events += chunk.count(b"data: {")
        self._tail = (self._tail + chunk)[-2048:]

    def tokens(self) -> int:
        # The usage chunk a caller asked for, or the comment a node ends every other stream with.
        found = _USAGE.findall(self._tail)
        if found:
            return int(found[-1])
        # Neither (an answer cut short): one event per token, plus those that carry none, at most.
        return max(self._events - self._overhead, 0) if self._stream else 0

    def done(self, outcome: str) -> None:
        self._metrics.requests.labels(self._model, outcome).inc()
        if outcome != "ok" or self._first_at is None:
            return
        tokens = self.tokens()
        # A stream's first token is its time to first token's: the rate is of those after it, up to the chunk
        # that brought the last (not the end of the exchange: releasing the lease is a Redis round trip).
        counted, since = (tokens - 1, self._first_at) if self._stream else (tokens, self._started)
        elapsed = self._last_at - since
        if counted > 0 and elapsed > 0:
            self._metrics.rate.labels(self._model).observe(counted / elapsed)
