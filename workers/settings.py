"""Settings of a worker process (one node)."""

import os
import re
import socket
from pathlib import Path
from typing import Literal

import psutil
from pydantic import ByteSize, Field, field_validator

from broker.settings import BrokerSettings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


DEFAULT_BUDGET_SHARE = 0.75
"""Without --memory-budget a node may fill this share of the machine's RAM, leaving the rest to the system."""


def default_memory_budget() -> int:
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)


def default_threads() -> int:
    """Explicit, never -1: threads=-1 segfaulted ctransformers on small models."""
    return max(1, min(4, os.cpu_count() or 1))


class WorkerSettings(BrokerSettings):
    """One node: its name, where its models and state live, and how much it may load."""

    name: str = "node"
    models_dir: Path = Path("models")
    state_dir: Path | None = None
    # Each running job holds a thread (a joined load too); lists need a free one, so keep plenty.
    concurrency: int = Field(default=16, ge=2, le=128)
    threads: int = Field(default_factory=default_threads, ge=1, le=256)
    memory_budget: ByteSize | None = None
    # ctransformers build: "auto" uses CUDA when a GPU is visible and its runtime is installed, else the best
    # CPU build. `gpuLayers` offloads layers only with the CUDA build.
    lib: Literal["auto", "cuda", "avx2", "avx", "basic"] = "auto"
    # Correct each reservation upwards with how much a load measurably grew the process (off: estimates only,
    # which makes the budget's arithmetic exact and repeatable).
    measure_loads: bool = True
    """None: `default_memory_budget()`, applied when the node is built."""
    health_interval: float = Field(default=10.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # `%h` is this machine's hostname, as in Celery's `-n`: replicas of one compose service get distinct names.
        value = value.replace("%h", socket.gethostname())
        if not NAME_RE.fullmatch(value):
            raise ValueError("a node name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else Path(".modelfleet") / "nodes" / self.name
