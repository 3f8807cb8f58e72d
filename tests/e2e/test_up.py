"""`modelfleet up` as a user runs it: a subprocess in a fresh directory, driven over HTTP, stopped with Ctrl-C.

Ctrl-C in a terminal sends SIGINT to the foreground process group. `up` runs here in its own session, so
`os.killpg(up.pid, SIGINT)` is exactly that keystroke; `up` starts its children in sessions of their own, so
the signal reaches only the supervisor, which must then stop every child itself.
"""

import contextlib
import os
import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import httpx
import psutil
import pytest
import redis
from dotenv import dotenv_values

from broker import keys
from modelfleet.up import default_signals
from tests.conftest import REDIS_PASSWORD, Proc, RedisServer, free_port, modelfleet_command, wait_for
from workers.gguf_factory import write_not_gguf, write_tiny_llama

BANNER_END = "Ctrl-C stops everything."
STOP_WITHIN = 20.0


@dataclass
class Banner:
    """What `up` prints once everything is running."""

    url: str
    fingerprint: str
    operator_key: str | None
    read_key: str | None

    @classmethod
    def parse(cls, text: str) -> "Banner":
        def find(pattern: str) -> str | None:
            match = re.search(pattern, text, re.MULTILINE)
            return match.group(1) if match else None

        url = find(r"modelfleet is up: API (http://\S+)")
        fp = find(r"^\s+local node\s+([0-9a-f]{16,64})\s")
        assert url and fp, f"no API URL or node fingerprint in the banner:\n{text}"
        return cls(url, fp, find(r"^\s+operator key\s+(\S+)$"), find(r"^\s+read-only key\s+(\S+)$"))


@dataclass
class Up:
    """One `modelfleet up` process, its combined output in a file, in a directory of its own."""

    cwd: Path
    args: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def out_path(self) -> Path:
        return self.cwd.parent / f"{self.cwd.name}-up.out"

    def start(self) -> "Up":
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
        env |= {"PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.out_path, "wb") as out:
            self.popen = subprocess.Popen(
                [*modelfleet_command(), "up", *self.args],
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=default_signals,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def wait_banner(self, timeout: float = 60.0) -> Banner:
        def ready() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"modelfleet up exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
            return BANNER_END in self.output()

        wait_for(ready, timeout, "modelfleet up to print its banner")
        return Banner.parse(self.output())

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ctrl_c(self) -> None:
        os.killpg(self.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def cleanup(self) -> None:
        """Teardown after a failed test: Ctrl-C, then kill whatever is left, so no test leaks processes."""
        if self.popen is None:
            return
        left = self.children()
        if self.popen.poll() is None:
            self.ctrl_c()
            try:
                self.popen.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.fixture
def run_up(tmp_path: Path) -> Iterator[object]:
    """`run_up(*args, cwd=..., env=...)` starts `modelfleet up`; every one started is stopped at teardown."""
    started: list[Up] = []

    def start(*args: str, cwd: str = "run", env: dict[str, str] | None = None) -> Up:
        up = Up(tmp_path / cwd, list(args), env or {}).start()
        started.append(up)
        return up

    yield start
    for up in reversed(started):
        up.cleanup()


def role(proc: psutil.Process) -> str:
    """Which of up's children this is, from its command line."""
    cmdline = " ".join(proc.cmdline())
    if "redis-server" in cmdline:
        return "redis"
    if " worker" in cmdline:
        return "worker"
    if " api" in cmdline:
        return "api"
    return cmdline


def assert_all_gone(children: list[psutil.Process]) -> None:
    alive = [f"{role(p)} (pid {p.pid})" for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after `up` exited: {alive}"


def stop_with_ctrl_c(up: Up) -> str:
    up.ctrl_c()
    try:
        code = up.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`up` did not stop within {STOP_WITHIN}s of Ctrl-C:\n{up.output()[-4000:]}") from None
    assert code == 0, f"`up` exited with {code} on Ctrl-C:\n{up.output()[-4000:]}"
    return up.output()


def client(banner: Banner, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=banner.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def gguf_description(path: Path) -> str:
    return str(gguf.GGUFReader(path).fields["general.description"].contents())


def load_list_unload(banner: Banner, model_id: str) -> None:
    """The README's walk-through: load a model, see it loaded and healthy, unload it."""
    fp = banner.fingerprint
    with client(banner, banner.operator_key) as op:
        loaded = op.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": model_id})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["state"] == "loaded"
        listed = op.get(f"/api/v1/nodes/{fp}/models")
        assert listed.status_code == 200, listed.text
        [model] = [m for m in listed.json()["data"] if m["id"] == model_id]
        assert model["state"] == "loaded" and model["healthy"] is True
        unloaded = op.post(f"/api/v1/nodes/{fp}/models/unload", json={"modelId": model_id})
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["state"] == "unloaded"
        after = op.get(f"/api/v1/nodes/{fp}/models").json()["data"]
        assert model_id not in [m["id"] for m in after]


def test_up_serves_the_readme_walkthrough_and_ctrl_c_stops_every_child(run_up, tmp_path: Path) -> None:
    port = free_port()
    up = run_up("--port", str(port))
    banner = up.wait_banner()
    run = tmp_path / "run"

    assert banner.url == f"http://127.0.0.1:{port}"
    assert banner.operator_key and banner.read_key and banner.operator_key != banner.read_key
    keys_file = run / ".modelfleet" / "keys"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    saved = dotenv_values(keys_file)
    assert saved["MODELFLEET_OPERATOR_KEYS"] == saved["MODELFLEET_KEY"] == banner.operator_key
    assert saved["MODELFLEET_API_KEYS"] == banner.read_key and saved["MODELFLEET_URL"] == banner.url
    demo = run / "models" / "demo-tiny.gguf"
    assert demo.is_file()
    description = gguf_description(demo)
    assert "demo" in description and "random" in description
    assert "demo-tiny.gguf: random weights" in up.output()

    children = up.children()
    assert sorted(role(p) for p in children) == ["api", "redis", "worker"], [p.cmdline() for p in children]

    fp = banner.fingerprint
    with client(banner, banner.operator_key) as op:
        nodes = op.get("/api/v1/nodes")
        assert nodes.status_code == 200, nodes.text
        [node] = nodes.json()["data"]
        assert node["fingerprint"] == fp and node["online"] is True
    load_list_unload(banner, "demo-tiny")
    with client(banner, banner.read_key) as ro:
        assert ro.get(f"/api/v1/nodes/{fp}/models").status_code == 200
        refused = ro.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": "demo-tiny"})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    with client(banner, banner.operator_key) as op:
        assert op.get(f"/api/v1/nodes/{fp}/models").json()["data"] == []  # the refused load did nothing

    # The banner's inference endpoint answers with either key once the demo model is loaded there.
    endpoint = re.search(r"inference\s+(http://\S+)/v1", up.output())
    assert endpoint, up.output()
    with client(banner, banner.operator_key) as op:
        assert op.post("/api/v1/nodes/" + fp + "/models/load", json={"modelId": "demo-tiny"}).status_code == 200
    body = {"model": "demo-tiny", "prompt": "Hi", "max_tokens": 3}
    with httpx.Client(base_url=endpoint[1], headers={"Authorization": f"Bearer {banner.read_key}"}) as node:
        answer = node.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 3
    with client(banner, banner.operator_key) as op:
        assert op.post("/api/v1/nodes/" + fp + "/models/unload", json={"modelId": "demo-tiny"}).status_code == 200

    # Running `up` twice on one port: the second fails at once, touching nothing; the first is unharmed.
    second = run_up("--port", str(port), cwd="second")
    try:
        code = second.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a second `up` on a taken port did not fail fast:\n{second.output()}") from None
    assert code == 2
    assert f"127.0.0.1:{port} is already in use; pick another with --port" in second.output()
    assert not (tmp_path / "second" / ".modelfleet").exists()
    assert not (tmp_path / "second" / "models").exists()
    with client(banner, banner.read_key) as ro:
        assert ro.get("/api/v1/nodes").json()["data"][0]["online"] is True

    stop_with_ctrl_c(up)
    assert_all_gone(children)


def test_up_with_redis_url_starts_no_redis_and_leaves_that_redis_running(run_up, redis_server: RedisServer) -> None:
    up = run_up("--port", str(free_port()), "--redis-url", redis_server.url)
    banner = up.wait_banner()
    children = up.children()
    assert sorted(role(p) for p in children) == ["api", "worker"], [p.cmdline() for p in children]
    assert REDIS_PASSWORD not in up.output()

    store = redis_server.client()
    assert store.sismember(keys.nodes_set(), banner.fingerprint)  # the node registered in the given Redis
    with client(banner, banner.read_key) as ro:
        nodes = {n["fingerprint"]: n for n in ro.get("/api/v1/nodes").json()["data"]}
        assert nodes[banner.fingerprint]["online"] is True
    load_list_unload(banner, "demo-tiny")

    stop_with_ctrl_c(up)
    assert_all_gone(children)
    assert store.ping()  # `up` stops only what it started
    assert not store.exists(keys.node_alive(banner.fingerprint))  # the worker marked its node offline


def test_up_writes_no_demo_model_when_models_holds_one(run_up, tmp_path: Path, redis_server: RedisServer) -> None:
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    write_tiny_llama(models / "mine.gguf", seed=7)
    write_not_gguf(models / "a-note.gguf")  # first by name, and no model: the banner must not offer it

    up = run_up("--port", str(free_port()), "--redis-url", redis_server.url)
    banner = up.wait_banner()
    assert sorted(p.name for p in models.iterdir()) == ["a-note.gguf", "mine.gguf"]
    assert "demo model" not in up.output()
    # The banner's load line names the model that is there, ready to copy.
    [load_line] = [c for c in next_commands(up.output()) if c.startswith("modelfleet load ")]
    assert load_line == "modelfleet load local mine"
    loaded = shell(load_line, tmp_path / "run")
    assert loaded.returncode == 0 and "Loaded mine on local" in loaded.stdout, (loaded.stdout, loaded.stderr)
    with client(banner, banner.operator_key) as op:
        assert op.post(f"/api/v1/nodes/{banner.fingerprint}/models/unload", json={"modelId": "mine"}).status_code == 200
    load_list_unload(banner, "mine")
    stop_with_ctrl_c(up)


def test_children_stop_when_up_itself_is_killed(run_up, tmp_path: Path) -> None:
    up = run_up("--port", str(free_port()))
    up.wait_banner()
    children = up.children()
    assert sorted(role(p) for p in children) == ["api", "redis", "worker"]
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)

    def gone() -> bool:
        return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in children)

    wait_for(gone, 20, "up's children to stop after up was SIGKILLed")


# The state directory: the keys and Redis URL `up` keeps, one `up` per directory, and the commands its banner
# offers, run as a newcomer would copy them (in that directory, or anywhere after sourcing the keys).


def clean_env() -> dict[str, str]:
    """A newcomer's shell: no MODELFLEET_* variable set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")} | {"PYTHONUNBUFFERED": "1"}


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One line of the banner, in bash, as pasted into a terminal."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        preexec_fn=default_signals,
    )


def next_commands(output: str) -> list[str]:
    block = output.split("next, in this directory (or anywhere after the first line):\n", 1)[1]
    block = block.split("Ctrl-C stops everything.", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_up_keeps_its_fleet_in_the_state_directory_and_commands_there_join_it(run_up, tmp_path: Path) -> None:
    run = tmp_path / "run"
    up: Up = run_up("--port", str(free_port()))
    banner = up.wait_banner()
    keys_file = run / ".modelfleet" / "keys"
    saved = dotenv_values(keys_file)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert saved["MODELFLEET_URL"] == banner.url and saved["MODELFLEET_KEY"] == banner.operator_key
    assert redis.Redis.from_url(saved["MODELFLEET_REDIS_URL"]).ping()  # the password is there, and right

    # The banner's commands, exactly: from another directory after its first line (`. keys`), and in `run`.
    commands = next_commands(up.output())
    assert commands[0] == f". {keys_file}" and "modelfleet load local demo-tiny" in commands
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in ("modelfleet load local demo-tiny", "modelfleet ps"):
        done = shell(f"{commands[0]} && {command}", elsewhere)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert re.search(r"^local\s+demo-tiny\s+loaded\s", done.stdout, re.MULTILINE), done.stdout
    unsourced = shell("modelfleet unload local demo-tiny", run)  # in the directory, no sourcing needed
    assert unsourced.returncode == 0 and "Unloaded demo-tiny from local." in unsourced.stdout, unsourced.stderr

    # A second `up` on the same directory names the first and changes nothing.
    second = Up(run, ["--port", str(free_port())]).start()
    assert second.wait(60) == 2
    assert f"another `modelfleet up` (pid {up.pid}) is running on {run / '.modelfleet'}" in second.output()
    assert dotenv_values(keys_file) == saved

    # `modelfleet worker` and `modelfleet flower`, run there as the banner says, join this fleet.
    [worker_line] = [c for c in commands if c.startswith("modelfleet worker")]
    [flower_line] = [c for c in commands if c.startswith("modelfleet flower")]
    flower_port = free_port()
    # Proc runs each in its log's directory: here, `run`, where `up` was started.
    worker = Proc("second", [*modelfleet_command(), *worker_line.split()[1:]], clean_env(), run / "second-worker.log")
    flower = Proc(
        "flower",
        [*modelfleet_command(), *flower_line.split()[1:], "--port", str(flower_port)],
        clean_env(),
        run / "flower.log",
    )
    for proc in (worker, flower):
        proc.start()
        assert proc.popen is not None
    try:
        with httpx.Client(base_url=banner.url, headers={"Authorization": f"Bearer {banner.operator_key}"}) as op:

            def second_online() -> bool:
                assert worker.alive(), worker.log()[-2000:]
                return any(n["name"] == "second" and n["online"] for n in op.get("/api/v1/nodes").json()["data"])

            wait_for(second_online, 60, "the second worker to join")
            user, password = saved["MODELFLEET_FLOWER_AUTH"].split(":", 1)

            def flower_sees_both() -> bool:
                assert flower.alive(), flower.log()[-2000:]
                url = f"http://127.0.0.1:{flower_port}/api/workers"
                try:
                    alive = httpx.get(url, params={"status": "true"}, auth=(user, password)).json()
                except (httpx.HTTPError, ValueError):
                    return False
                return sum(bool(up) for host, up in alive.items() if host.startswith(("local.", "second."))) == 2

            wait_for(flower_sees_both, 90, "Flower to list both nodes")
        stop_with_ctrl_c(up)

        # The next `up` reuses the keys and the Redis URL: the exported key works, the second node stays.
        again = Up(run, ["--port", str(free_port())]).start()
        try:
            rerun = again.wait_banner()
            # A restart reuses the keys and does not print them again (its output is no terminal).
            assert (rerun.operator_key, rerun.read_key) == (None, None)
            assert "not shown again" in again.output()
            after = dotenv_values(keys_file)
            assert (after["MODELFLEET_OPERATOR_KEYS"], after["MODELFLEET_API_KEYS"]) == (
                banner.operator_key,
                banner.read_key,
            )
            assert after["MODELFLEET_REDIS_URL"] == saved["MODELFLEET_REDIS_URL"]
            headers = {"Authorization": f"Bearer {saved['MODELFLEET_KEY']}"}

            def both_online() -> bool:
                nodes = httpx.get(f"{rerun.url}/api/v1/nodes", headers=headers).json()["data"]
                return sorted(n["name"] for n in nodes if n["online"]) == ["local", "second"]

            wait_for(both_online, 60, "both nodes online on the restarted fleet")
            stop_with_ctrl_c(again)
        finally:
            again.cleanup()
    finally:
        worker.stop()
        flower.stop()
