"""Settings of a worker process (one node)."""

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import psutil
from pydantic import ByteSize, Field, field_validator
from pydantic_settings import NoDecode

from broker.settings import KeyedSettings, split_secrets

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


DEFAULT_BUDGET_SHARE = 0.75
"""Without --memory-budget a node may fill this share of the machine's RAM, leaving the rest to the system."""
DEFAULT_STREAM_INTERVAL = 0.01
"""Seconds between a stream's writes after its first token (`workers.inference.server._stream`)."""


def default_memory_budget() -> int:
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)


def default_threads(cpus: int | None = None) -> int:
    """Half the CPUs, 1 to 4 (llama-cpp-python's own default is half the CPUs). Never all of them: the 2023 ggml
    inside ctransformers spin-waits its threads at every step, and with a thread on every CPU any other busy
    process (the API and Redis beside `modelfleet up`, or the node's own HTTP thread) stalls each token; measured
    on 2 CPUs, a 200-token answer took 0.05-0.15 s with 1 thread and 0.08-5 s with 2. Explicit, never -1:
    threads=-1 segfaulted ctransformers on small models."""
    return max(1, min(4, (cpus if cpus is not None else os.cpu_count() or 1) // 2))


class WorkerSettings(KeyedSettings):
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
    # Which backend runs the models: "auto" picks one per file from its GGUF header (ctransformers for what it
    # supports, llama.cpp for the rest when installed); a backend's name runs every model with it.
    backend: str = "auto"
    # Correct each reservation upwards with how much a load measurably grew the process (off: estimates only,
    # which makes the budget's arithmetic exact and repeatable).
    measure_loads: bool = True
    """None: `default_memory_budget()`, applied when the node is built."""
    health_interval: float = Field(default=10.0, gt=0)
    # The inference endpoint (OpenAI wire format) this process serves, unless `serve` is off. Port None: 8081, or
    # any free port when 8081 is taken (several nodes on one machine need no flags); a given port is used or the
    # node refuses to start; 0: any free port.
    serve: bool = True
    serve_port: int | None = Field(default=None, ge=0, le=65535)
    serve_host: str = "127.0.0.1"
    advertise_url: str | None = None
    """The base URL the head and clients use (default http://SERVE_HOST:PORT); `%h` is the hostname."""
    # Direct calls to the inference endpoint need one of the fleet's keys (KeyedSettings, either scope) or the
    # node token (BrokerSettings.node_token).
    stream_interval: float = Field(default=DEFAULT_STREAM_INTERVAL, ge=0, le=1)
    """Seconds between a stream's writes after its first token: faster tokens go out together (see
    `workers.inference.server._stream`); 0 writes every token on its own."""
    max_queue: int = Field(default=8, ge=0, le=10_000)
    """Generations that may wait per model while one runs; beyond that, 429 with Retry-After."""
    keep_alive: float | None = Field(default=None, ge=0)
    """Seconds a model may stay unused before it unloads itself, unless its load says otherwise. None/0: never."""
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model ids to load when the node starts."""

    _split_preload = field_validator("preload", mode="before")(split_secrets)

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.replace("%h", socket.gethostname()).rstrip("/")
        if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", value):
            raise ValueError("the advertised URL is http(s)://host[:port][/path], without credentials or query")
        return value

    def endpoint(self, port: int) -> str:
        """The base URL to register, once the serving port is known."""
        if self.advertise_url:
            return self.advertise_url
        # A wildcard bind is for heads on other machines: 127.0.0.1 would send them to their own loopback (and
        # the node token with it). The host's own name is what they can reach; --advertise-url overrides it.
        host = socket.getfqdn() if self.serve_host in ("0.0.0.0", "::", "") else self.serve_host  # noqa: S104
        return f"http://{host}:{port}"

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        from workers.backends import AUTO, BACKEND_NAMES

        if value not in (AUTO, *BACKEND_NAMES):
            raise ValueError(f"choose one of {', '.join((AUTO, *BACKEND_NAMES))}")
        return value

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
