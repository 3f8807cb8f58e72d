"""Flower, started as an operator starts it (`modelfleet flower`), watching a real fleet through its own REST API.

Two nodes and an API run against the test Redis; Flower must list both nodes as workers, show a load sent through
the API with its arguments and final state, refuse everything without basic auth, refuse every mutating
endpoint even with it (read-only), and never show a secret: not the Redis password, not an API key, not its
own password, in an answer or in its log.
"""

import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from celery.app.utils import find_app

from modelfleet.up import default_signals
from tests.conftest import (
    ALL_SECRETS,
    OPERATOR_KEY,
    REDIS_PASSWORD,
    Fleet,
    Proc,
    free_port,
    modelfleet_command,
    wait_for,
)
from tests.e2e.test_secrets import MASKED_URL, leaked

pytestmark = pytest.mark.timeout(90)

FLOWER_USER = "ops"
FLOWER_PASSWORD = "fpw-SECRET-" + secrets.token_hex(8)
SECRETS = (*ALL_SECRETS, FLOWER_PASSWORD)
# Kombu masks a URL's password as `**`, Celery's config dump (the workers' `conf`) as `********`.
UNMASKED_URL = re.compile(r"rediss?://[^\s/@]*:(?!\*+@)[^\s/@]+@")


def flower_argv(port: int) -> list[str]:
    """`modelfleet flower` as the suite runs it; tests/test_compose.py holds compose.yaml to these flags."""
    return [*modelfleet_command(), "flower", "--port", str(port), "--address", "127.0.0.1"]


def start_flower(fleet: Fleet) -> tuple[Proc, str]:
    port = free_port()
    env = fleet.env(MODELFLEET_FLOWER_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}")
    proc = Proc("flower", flower_argv(port), env, fleet.root / "flower.log").start()
    fleet.procs.append(proc)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not proc.alive():
            raise AssertionError(f"Flower exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(url + "/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 60, "Flower to answer /healthcheck")  # a loaded CI machine starts it slowly
    return proc, url


def test_flower_sees_every_node_and_a_load_job_and_keeps_secrets(fleet: Fleet, models_dir: Path) -> None:
    nodes = [fleet.worker(name, models_dir, wait=False) for name in ("flower-a", "flower-b")]
    flower, url = start_flower(fleet)
    api = fleet.api()
    for node in nodes:
        fleet.wait_online(node)
    answers: list[str] = []

    def record(response: httpx.Response) -> None:
        response.read()
        answers.append(f"{response.request.url} {response.status_code}\n{dict(response.headers)}\n{response.text}")

    hooks = {"response": [record]}
    with (
        httpx.Client(base_url=url, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=10, event_hooks=hooks) as fl,
        httpx.Client(base_url=url, timeout=10, event_hooks=hooks) as anon,
    ):
        # Heartbeat events from both nodes: Flower's event receiver is live, so it sees the job from "sent" on.
        def both_heard() -> bool:
            alive = fl.get("/api/workers", params={"status": "true"}).json()
            return all(any(n.name in host and up for host, up in alive.items()) for n in nodes)

        wait_for(both_heard, 15, "Flower to hear both nodes' heartbeats")

        def both_listed() -> dict[str, Any]:
            workers: dict[str, Any] = fl.get("/api/workers", params={"refresh": "true"}).json()
            return workers if all(any(n.name in host for host in workers) for n in nodes) else {}

        workers = wait_for(both_listed, 15, "Flower to list both nodes as workers")
        assert isinstance(workers, dict)
        for node in nodes:
            [host] = [h for h in workers if h.startswith(f"{node.name}.")]
            assert host.startswith(f"{node.name}.{node.fingerprint[:8]}@")

        with api.client(OPERATOR_KEY) as op:
            load = op.post(
                f"/api/v1/nodes/{nodes[0].fingerprint}/models/load", json={"modelId": "tiny-a", "contextLength": 96}
            )
            assert load.status_code == 200, load.text

        def load_succeeded() -> list[dict[str, Any]]:
            tasks = fl.get("/api/tasks", params={"taskname": "modelfleet.load"}).json()
            return [t for t in tasks.values() if t["state"] == "SUCCESS"]

        succeeded = wait_for(load_succeeded, 15, "Flower to show the load as SUCCESS")
        assert isinstance(succeeded, list)
        [task] = succeeded
        assert task["name"] == "modelfleet.load"
        assert task["worker"].startswith(f"flower-a.{nodes[0].fingerprint[:8]}@")
        assert "'modelId': 'tiny-a'" in task["kwargs"] and "'contextLength': 96" in task["kwargs"]
        assert task["sent"] and task["received"] and task["succeeded"]  # seen from "sent" (the API) onwards
        info = fl.get(f"/api/task/info/{task['uuid']}")
        assert info.status_code == 200 and info.json()["state"] == "SUCCESS"

        # A job that answers an error is a FAILURE task, while the API still gets the node's typed error.
        with api.client(OPERATOR_KEY) as op:
            missing = op.post(f"/api/v1/nodes/{nodes[0].fingerprint}/models/load", json={"modelId": "no-such"})
        assert missing.status_code == 404 and missing.json()["code"] == "model_file_not_found", missing.text
        assert "no-such" in missing.json()["error"]

        def load_failed() -> list[dict[str, Any]]:
            tasks = fl.get("/api/tasks", params={"taskname": "modelfleet.load", "state": "FAILURE"}).json()
            return list(tasks.values())

        failed = wait_for(load_failed, 15, "Flower to show the failed load as FAILURE")
        assert isinstance(failed, list)
        [failure] = failed
        assert failure["state"] == "FAILURE" and failure["exception"] == "JobFailed('model_file_not_found')"
        assert failure["failed"] and "'modelId': 'no-such'" in failure["kwargs"]
        assert fl.get(f"/api/task/info/{failure['uuid']}").json()["state"] == "FAILURE"
        assert "Traceback" not in nodes[0].log()  # an expected failure: one line, not a stack

        # Basic auth is required: no credentials, a wrong password, or a secret as the password.
        for path in ("/api/workers", "/api/tasks", f"/api/task/info/{task['uuid']}", "/tasks", "/broker"):
            assert anon.get(path).status_code == 401, path
        for password in ("wrong", REDIS_PASSWORD, OPERATOR_KEY):
            assert anon.get("/api/tasks", auth=(FLOWER_USER, password)).status_code == 401

        # Read-only: nothing that applies, revokes or controls answers, with credentials or without.
        host = next(h for h in workers if h.startswith("flower-a."))
        mutating = [
            f"/api/task/revoke/{task['uuid']}",
            f"/api/task/abort/{task['uuid']}",
            "/api/task/async-apply/modelfleet.unload_all",
            "/api/task/send-task/modelfleet.unload_all",
            f"/api/worker/shutdown/{host}",
            f"/api/worker/pool/restart/{host}",
            f"/api/worker/queue/cancel-consumer/{host}?queue=x",
        ]
        for path in mutating:
            assert anon.post(path, json={}).status_code == 401, path
            assert fl.post(path, json={}).status_code == 403, path
        assert all(node.alive() for node in nodes)

        # Everything else Flower shows, for the secret grep below.
        for path in ("/", "/tasks", "/broker", f"/task/{task['uuid']}", f"/worker/{host}", "/metrics"):
            assert fl.get(path).status_code == 200, path
        table: dict[str, str | int] = {
            "draw": 1,
            "start": 0,
            "length": 10,
            "order[0][column]": 0,
            "columns[0][data]": "name",
        }
        rows = fl.get("/tasks/datatable", params=table)
        assert rows.status_code == 200 and {r["uuid"] for r in rows.json()["data"]} == {task["uuid"], failure["uuid"]}

    assert not leaked(" ".join(psutil.Process(flower.pid).cmdline()), SECRETS)
    flower.stop()
    log = flower.log()
    assert "read-only, basic auth" in log and MASKED_URL in log
    assert not leaked(log, SECRETS), leaked(log, SECRETS)
    assert UNMASKED_URL.search(f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")  # the grep below can fail
    assert not UNMASKED_URL.search(log)
    assert len(answers) > 30 and any("redis://:********@" in a for a in answers)  # the grep saw a URL
    for answer in answers:
        assert not leaked(answer, SECRETS), answer[:300]
        assert not UNMASKED_URL.search(answer), answer[:300]


def _flower_exits(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        flower_argv(free_port()), env=env, capture_output=True, text=True, timeout=30, preexec_fn=default_signals
    )


def test_flower_refuses_to_start_without_auth(fleet: Fleet) -> None:
    unset = _flower_exits(fleet.env())
    assert unset.returncode == 2
    assert "refusing to start Flower without basic auth" in unset.stderr
    assert "MODELFLEET_FLOWER_AUTH" in unset.stderr

    no_password = _flower_exits(fleet.env(MODELFLEET_FLOWER_AUTH=FLOWER_PASSWORD))
    assert no_password.returncode == 2
    assert "flower_auth" in no_password.stderr and "user:password" in no_password.stderr
    assert FLOWER_PASSWORD not in no_password.stderr + no_password.stdout


def test_the_documented_celery_line_finds_the_app_lazily_and_serves_read_only(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelfleet.flower

    monkeypatch.setenv("MODELFLEET_REDIS_URL", fleet.redis.url)
    assert "app" not in vars(modelfleet.flower)  # built when Celery asks for it, not at import
    assert find_app("modelfleet.flower").conf.broker_url == fleet.redis.url

    port = free_port()
    celery = shutil.which("celery") or "celery"
    argv = [celery, "-A", "modelfleet.flower", "flower", "--read-only", f"--port={port}", "--address=127.0.0.1"]
    env = fleet.env(FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}")
    proc = Proc("celery-flower", argv, env, fleet.root / "celery-flower.log").start()
    fleet.procs.append(proc)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.alive(), proc.log()[-3000:]
        try:
            return httpx.get(url + "/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 20, "celery ... flower to answer")
    assert httpx.get(url + "/api/workers").status_code == 401
    auth = (FLOWER_USER, FLOWER_PASSWORD)
    assert httpx.get(url + "/api/workers", auth=auth).status_code == 200
    assert httpx.post(url + "/api/task/revoke/x", auth=auth).status_code == 403
