"""compose.yaml is valid (Debian's `docker-compose config`, no Docker engine needed) and runs only what the suite
runs: every modelfleet service's command is `api`, `worker` or `flower` with flags that `modelfleet` accepts and
that the suite's own harness passes when it starts that process (tests/conftest.py, tests/e2e/test_flower.py).
"""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.cli import build_parser
from tests.conftest import ROOT, Fleet, Proc, RedisServer, modelfleet_command
from tests.e2e.test_flower import flower_argv

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (.ci/run installs Debian's with apt-get); compose.yaml is unchecked",
)

REQUIRED = {
    "REDIS_PASSWORD": "compose-rpw-1234",
    "MODELFLEET_OPERATOR_KEYS": "compose-op-1234",
    "MODELFLEET_API_KEYS": "compose-ro-1234",
    "MODELFLEET_NODE_TOKEN": "compose-ntk-1234",
    "FLOWER_AUTH": "ops:compose-fpw-1234",
}
MODELFLEET_SERVICES = {"api", "worker", "flower"}


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED and k != "MODELS_DIR"}
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    done = compose_config(**REQUIRED)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services: dict[str, Any] = config["services"]
    return services


def flags(argv: list[str]) -> set[str]:
    return {arg for arg in argv if arg.startswith("--")}


@pytest.fixture
def suite_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The argv after `modelfleet` of each process the suite starts, taken from the harness without starting it."""
    monkeypatch.setattr(Proc, "start", lambda self: self)
    fleet = Fleet(RedisServer(0, "unused", None), tmp_path)  # type: ignore[arg-type]
    prefix = len(modelfleet_command())
    argvs = [fleet.worker("n", tmp_path, wait=False).argv, fleet.api(wait=False).argv, flower_argv(5555)]
    return {argv[prefix]: argv[prefix:] for argv in argvs}


def test_every_required_variable_is_enforced() -> None:
    for name in REQUIRED:
        done = compose_config(**{k: v for k, v in REQUIRED.items() if k != name})
        assert done.returncode != 0
        assert f"set {name}" in done.stderr, done.stderr


def test_every_modelfleet_command_is_one_the_suite_runs(
    services: dict[str, Any], suite_commands: dict[str, list[str]]
) -> None:
    assert set(services) == {"redis", *MODELFLEET_SERVICES}
    assert set(suite_commands) == MODELFLEET_SERVICES
    parser = build_parser()
    for name in MODELFLEET_SERVICES:
        service = services[name]
        assert service["image"] == "modelfleet:latest" and service["build"]["context"] == str(ROOT)
        command = service["command"]
        assert command[0] == name
        parsed = parser.parse_args(command)  # exits (fails the test) on a flag or value modelfleet refuses
        assert parsed.command == name
        assert flags(command) <= flags(suite_commands[name]), (name, command, suite_commands[name])
    assert (ROOT / "Dockerfile").is_file()
    assert 'ENTRYPOINT ["modelfleet"]' in (ROOT / "Dockerfile").read_text()


def test_redis_has_a_password_a_healthcheck_and_a_volume(services: dict[str, Any]) -> None:
    redis = services["redis"]
    password = REQUIRED["REDIS_PASSWORD"]
    assert redis["image"].startswith("redis:7")
    assert redis["environment"]["REDISCLI_AUTH"] == password  # for redis-cli, without `-a` on its command line
    assert "--requirepass" in " ".join(redis["command"]) and "--appendonly yes" in " ".join(redis["command"])
    assert password not in str(redis["command"]) + str(redis["healthcheck"])
    assert redis["volumes"] == ["redis-data:/data:rw"]
    url = f"redis://:{password}@redis:6379/0"
    for name in MODELFLEET_SERVICES:
        assert services[name]["environment"]["MODELFLEET_REDIS_URL"] == url
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_api_and_flower_take_their_secrets_from_the_environment(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["environment"]["MODELFLEET_OPERATOR_KEYS"] == REQUIRED["MODELFLEET_OPERATOR_KEYS"]
    assert api["environment"]["MODELFLEET_API_KEYS"] == REQUIRED["MODELFLEET_API_KEYS"]
    assert "8000/healthz" in " ".join(api["healthcheck"]["test"])
    assert services["flower"]["environment"]["MODELFLEET_FLOWER_AUTH"] == REQUIRED["FLOWER_AUTH"]
    for name in MODELFLEET_SERVICES:
        assert not any(secret in str(services[name]["command"]) for secret in REQUIRED.values())


def test_worker_replicas_are_distinct_nodes_with_read_only_models(services: dict[str, Any]) -> None:
    worker = services["worker"]
    command = worker["command"]
    # Distinct per replica with no edit: a name from the container's hostname, and the node key (the fingerprint)
    # in the container's own filesystem. The only mount is the models dir, read-only: no shared state volume.
    assert "%h" in command[command.index("--name") + 1]
    assert worker["volumes"] == [f"{ROOT / 'models'}:/models:ro"]
    assert command[command.index("--models-dir") + 1] == "/models"
    assert not command[command.index("--state-dir") + 1].startswith("/models")
    assert "ports" not in worker and "container_name" not in worker and "hostname" not in worker
    # Its inference endpoint: reachable on the compose network, advertised by the replica's own hostname, and
    # holding the same node token as the head.
    env = worker["environment"]
    assert env["MODELFLEET_SERVE_HOST"] == "0.0.0.0" and env["MODELFLEET_ADVERTISE_URL"] == "http://%h:8081"
    assert env["MODELFLEET_NODE_TOKEN"] == services["api"]["environment"]["MODELFLEET_NODE_TOKEN"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_models_dir_comes_from_the_environment(tmp_path: Path) -> None:
    done = compose_config(**REQUIRED, MODELS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["services"]["worker"]["volumes"] == [f"{tmp_path}:/models:ro"]
