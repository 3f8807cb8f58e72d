"""`api.metrics` on its own: job outcomes, the fleet gauges from a node snapshot, one registry per app.

The scrape of a real fleet is in tests/e2e/test_metrics.py.
"""

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import Metrics
from broker.errors import ModelNotLoaded, NodeError
from broker.schemas import ModelState, NodeInfo
from tests.conftest import node_info


def node(fp: str, name: str, *, online: bool, **fields: Any) -> NodeInfo:
    return node_info(fp, name, online=online, seconds_since_heartbeat=1.5, **fields)


def samples(metrics: Metrics, nodes: list[NodeInfo]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render(nodes, None)
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_job_outcomes_are_ok_the_error_code_or_cancelled() -> None:
    metrics = Metrics()
    with metrics.job("load"):
        pass
    with pytest.raises(ModelNotLoaded), metrics.job("unload"):
        raise ModelNotLoaded("not loaded")
    unknown = NodeError("from a newer node")
    unknown.code = "brand_new_code"  # type: ignore[misc]
    with pytest.raises(NodeError), metrics.job("load"):
        raise unknown
    with pytest.raises(asyncio.CancelledError), metrics.job("list"):
        raise asyncio.CancelledError
    with pytest.raises(ValueError), metrics.job("catalog"):
        raise ValueError("a bug")

    found = samples(metrics, [])
    for operation, outcome in [
        ("load", "ok"),
        ("unload", "model_not_loaded"),
        ("load", "node_error"),
        ("list", "cancelled"),
        ("catalog", "internal_error"),
    ]:
        labels = (("operation", operation), ("outcome", outcome))
        assert found[("modelfleet_jobs_total", labels)] == 1
        assert found[("modelfleet_job_duration_seconds_count", labels)] == 1
    assert not any("brand_new_code" in str(key) for key in found)


def test_fleet_gauges_come_from_the_snapshot_and_skip_offline_nodes_figures() -> None:
    up = node(
        "a" * 32,
        "gpu-1",
        online=True,
        model_states={ModelState.LOADED: 2, ModelState.LOADING: 1},
        memory_used_bytes=300,
        memory_budget_bytes=1000,
        rss_bytes=5000,
    )
    down = node("b" * 32, "gpu-2", online=False, model_states={ModelState.LOADED: 4}, memory_used_bytes=900)
    found = samples(Metrics(), [up, down])

    assert found[("modelfleet_nodes_registered", ())] == 2
    assert found[("modelfleet_nodes_online", ())] == 1
    ids = (("node", up.fingerprint), ("node_name", "gpu-1"))
    assert found[("modelfleet_node_online", ids)] == 1
    assert found[("modelfleet_node_online", (("node", down.fingerprint), ("node_name", "gpu-2")))] == 0
    by_state = {state: found[("modelfleet_node_models", (*ids, ("state", state.value)))] for state in ModelState}
    assert by_state == {
        ModelState.LOADING: 1,
        ModelState.LOADED: 2,
        ModelState.UNLOADING: 0,
        ModelState.UNLOADED: 0,
        ModelState.FAILED: 0,
    }
    assert found[("modelfleet_node_memory_budget_bytes", ids)] == 1000
    assert found[("modelfleet_node_memory_used_bytes", ids)] == 300
    assert found[("modelfleet_node_rss_bytes", ids)] == 5000
    # The offline node's last heartbeat describes a dead process: no models or memory for it.
    about_down = {name for name, labels in found if ("node", down.fingerprint) in labels}
    assert about_down == {"modelfleet_node_online", "modelfleet_node_heartbeat_age_seconds"}


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    with one.job("load"):
        pass
    assert ("modelfleet_jobs_total", (("operation", "load"), ("outcome", "ok"))) in samples(one, [])
    assert not any(name == "modelfleet_jobs_total" for name, _ in samples(two, []))


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    body, content_type = Metrics().render([], "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


@pytest.mark.parametrize("usage", [False, True])
def test_a_streams_tokens_per_second_counts_tokens_not_events(usage: bool) -> None:
    """A node's event may carry several tokens (it batches fast ones): the head counts the tokens from the
    usage chunk, or from the comment a node ends a stream with when no usage was asked for."""
    metrics = Metrics()
    tally = metrics.inference.tally("m", 0.0, stream=True, chat=False)
    frame = 'data: {"object":"text_completion","choices":[{"text":"%s","index":0}]}\n\n'
    tally.first((frame % "Once").encode())
    tally.chunk(((frame % " upon a") + (frame % " time there")).encode())  # 4 tokens in one write
    end = frame % ""
    end += 'data: {"choices":[],"usage":{"completion_tokens":7}}\n\n' if usage else ': {"completion_tokens":7}\n\n'
    tally.chunk((end + "data: [DONE]\n\n").encode())
    assert tally.tokens() == 7


def test_a_streams_rate_is_of_the_tokens_after_the_first_up_to_the_last_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """7 tokens: the first at t=1 s (its time is the TTFT's), the last in a chunk at t=2 s, and the exchange
    ended at t=5 s (a slow lease release): 6 tokens in 1 s, not 7 in 4."""
    clock = iter([1.0, 1.0, 1.5, 2.0])  # the first chunk reads the clock twice: its arrival, and as a chunk
    monkeypatch.setattr("api.metrics.time.perf_counter", lambda: next(clock))
    metrics = Metrics()
    tally = metrics.inference.tally("m", 0.5, stream=True, chat=False)
    frame = b'data: {"choices":[{"text":"x"}]}\n\n'
    tally.first(frame)
    tally.chunk(frame * 3)
    tally.chunk(frame * 3 + b'data: {"choices":[],"usage":{"completion_tokens":7}}\n\ndata: [DONE]\n\n')
    monkeypatch.setattr("api.metrics.time.perf_counter", lambda: 5.0)
    tally.done("ok")
    rate = metrics.registry.get_sample_value("modelfleet_inference_tokens_per_second_sum", {"model": "m"})
    ttft = metrics.registry.get_sample_value("modelfleet_inference_time_to_first_token_seconds_sum", {"model": "m"})
    assert (rate, ttft) == (6.0, 0.5)
