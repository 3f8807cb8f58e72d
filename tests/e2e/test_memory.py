"""Unload gives memory back: the node's own RSS, as its heartbeat reports it through the API."""

from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet, wait_for

MODEL_BYTES = 80 * 1024 * 1024


def fresh_rss(client: httpx.Client, fp: str) -> int:
    """The node's RSS from a heartbeat sent after this call (so it reflects what happened before it)."""
    before = client.get(f"/api/v1/nodes/{fp}").json()["lastHeartbeat"]

    def newer() -> int | None:
        node = client.get(f"/api/v1/nodes/{fp}").json()
        return node["rssBytes"] if node["lastHeartbeat"] != before else None

    return int(wait_for(newer, 10, "a fresh heartbeat"))  # type: ignore[arg-type]


@pytest.mark.timeout(180)
def test_rss_returns_to_baseline_after_load_unload_cycles(fleet: Fleet, tmp_path: Path) -> None:
    from workers.gguf_factory import write_tiny_llama

    models = tmp_path / "models"
    models.mkdir()
    write_tiny_llama(models / "big.gguf", pad_to_bytes=MODEL_BYTES)
    node = fleet.worker("mem", models)
    api = fleet.api()
    url = f"/api/v1/nodes/{node.fingerprint}/models"
    with api.client() as client:
        # One warm-up cycle: the first load maps the ggml library and its thread pools for good.
        assert client.post(f"{url}/load", json={"modelId": "big"}).status_code == 200
        assert client.post(f"{url}/unload", json={"modelId": "big"}).status_code == 200
        baseline = fresh_rss(client, node.fingerprint)

        assert client.post(f"{url}/load", json={"modelId": "big"}).status_code == 200
        loaded = fresh_rss(client, node.fingerprint)
        assert loaded > baseline + MODEL_BYTES // 2, "a loaded model must show in RSS, or this test proves nothing"
        [model] = client.get(url).json()["data"]
        # The node measured what the load took (it ran alone) and reserves at least that much of its budget.
        assert model["measuredBytes"] is not None and model["measuredBytes"] > MODEL_BYTES // 2
        node_info = client.get(f"/api/v1/nodes/{node.fingerprint}").json()
        assert node_info["memoryUsedBytes"] >= model["measuredBytes"]
        assert client.post(f"{url}/unload", json={"modelId": "big"}).status_code == 200

        for _ in range(4):
            assert client.post(f"{url}/load", json={"modelId": "big"}).status_code == 200
            assert client.post(f"{url}/unload", json={"modelId": "big"}).status_code == 200
        after = fresh_rss(client, node.fingerprint)
    assert after < baseline + 32 * 1024 * 1024, f"RSS {after} stayed far above its baseline {baseline}"
