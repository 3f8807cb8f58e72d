"""WorkerSettings' node name: `%h` expands to the hostname, so compose replicas get distinct names."""

import socket

import pytest
from pydantic import ValidationError

from workers.settings import WorkerSettings, default_threads


def test_percent_h_is_the_hostname() -> None:
    assert WorkerSettings(name="gpu-%h").name == f"gpu-{socket.gethostname()}"
    assert WorkerSettings(name="gpu-1").name == "gpu-1"


def test_percent_h_expands_before_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "3f9c2a7d1e0b")  # a container's hostname
    assert WorkerSettings(name="gpu-%h").name == "gpu-3f9c2a7d1e0b"
    assert WorkerSettings(name="%h").resolved_state_dir.name == "3f9c2a7d1e0b"
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")
    with pytest.raises(ValidationError, match="a node name is"):
        WorkerSettings(name="gpu-%h")


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_a_node_leaves_half_the_cpus_to_others_by_default(cpus: int, threads: int) -> None:
    """ctransformers' ggml spin-waits its threads: one on every CPU stalls each token whenever anything else runs."""
    assert default_threads(cpus) == threads
