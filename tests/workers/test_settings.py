"""WorkerSettings' node name: `%h` expands to the hostname, so compose replicas get distinct names."""

import socket

import pytest
from pydantic import ValidationError

from workers.settings import WorkerSettings


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
