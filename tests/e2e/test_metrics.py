"""`GET /metrics` scraped from a real API after real jobs on a real node (plus an offline node's registration)."""

import secrets
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.schemas import ModelState, NodeInfo
from tests.conftest import ALL_SECRETS, OPERATOR_KEY, READ_KEY, Api, Fleet, Worker, register_gone_node, wait_for

pytestmark = pytest.mark.timeout(90)

GIB = 1 << 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker(
        "metrics-node", models_dir, "--memory-budget", "1GiB", MODELFLEET_HEARTBEAT_INTERVAL="0.5"
    )


@pytest.fixture(scope="module")
def ghost(module_fleet: Fleet) -> NodeInfo:
    return register_gone_node(module_fleet)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker, ghost: NodeInfo) -> Api:
    return module_fleet.api()


def scrape(api: Api) -> tuple[str, Samples]:
    with api.client(READ_KEY) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, found


def jobs(found: Samples, operation: str, outcome: str, suffix: str = "_total") -> float:
    name = "modelfleet_jobs_total" if suffix == "_total" else f"modelfleet_job_duration_seconds{suffix}"
    return found.get((name, frozenset({("operation", operation), ("outcome", outcome)})), 0)


def test_scrape_after_jobs(api: Api, node: Worker, ghost: NodeInfo) -> None:
    missing = "missing-" + secrets.token_hex(6)
    invalid = "../invalid-" + secrets.token_hex(6)
    with api.client(OPERATOR_KEY) as op:
        url = f"/api/v1/nodes/{node.fingerprint}/models"
        assert op.post(url + "/load", json={"modelId": "tiny-a"}).status_code == 200
        assert op.post(url + "/load", json={"modelId": missing}).json()["code"] == "model_file_not_found"
        assert op.post(url + "/load", json={"modelId": invalid}).status_code == 422  # refused before any job
        assert op.get(url).status_code == 200
        offline = op.post(f"/api/v1/nodes/{ghost.fingerprint}/models/load", json={"modelId": "tiny-a"})
        assert offline.json()["code"] == "node_offline"
        try:
            ids = frozenset({("node", node.fingerprint), ("node_name", "metrics-node")})

            scrapes: list[tuple[str, Samples]] = []

            def loaded_in_heartbeat() -> bool:
                scrapes.append(scrape(api))
                return bool(scrapes[-1][1].get(("modelfleet_node_models", ids | {("state", "loaded")})))

            wait_for(loaded_in_heartbeat, 15, "the heartbeat to report tiny-a loaded")
            text, found = scrapes[-1]
        finally:
            op.post(url + "/unload-all")

    assert found[("modelfleet_nodes_registered", frozenset())] == 2
    assert found[("modelfleet_nodes_online", frozenset())] == 1
    assert found[("modelfleet_node_online", ids)] == 1
    assert found[("modelfleet_node_online", frozenset({("node", ghost.fingerprint), ("node_name", "ghost")}))] == 0
    states = {s: found[("modelfleet_node_models", ids | {("state", s.value)})] for s in ModelState}
    assert states[ModelState.LOADED] == 1 and sum(states.values()) == 1
    assert found[("modelfleet_node_memory_budget_bytes", ids)] == GIB
    assert 0 < found[("modelfleet_node_memory_used_bytes", ids)] < GIB
    assert found[("modelfleet_node_rss_bytes", ids)] > 0

    assert jobs(found, "load", "ok") == 1
    assert jobs(found, "load", "model_file_not_found") == 1
    assert jobs(found, "load", "node_offline") == 1
    assert jobs(found, "list", "ok") == 1
    assert jobs(found, "load", "ok", "_count") == 1 and jobs(found, "load", "ok", "_sum") > 0
    buckets = {
        labels: value
        for (name, labels), value in found.items()
        if name == "modelfleet_job_duration_seconds_bucket" and ("outcome", "model_file_not_found") in labels
    }
    assert max(buckets.values()) == 1 and any(("le", "+Inf") in labels for labels in buckets)

    for secret in (*ALL_SECRETS, missing, invalid.removeprefix("../")):
        assert secret not in text


def test_metrics_need_a_key(api: Api) -> None:
    with api.client(None) as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"
    with api.client(OPERATOR_KEY) as op:
        assert op.get("/metrics").status_code == 200
