"""`modelfleet up | api | worker | flower`: flags override `MODELFLEET_*` environment variables."""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import ValidationError

from broker.logs import configure_logging
from broker.settings import BrokerSettings
from modelfleet.commands import add_command, add_commands

log = logging.getLogger("modelfleet")


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _settings_error(exc: ValidationError) -> int:
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        print(f"modelfleet: invalid setting {where}: {err['msg']}", file=sys.stderr)
    return 2


def _secrets_of(settings: BrokerSettings) -> list[str]:
    """Every secret a process holds: the Redis URL and its password, and any API keys."""
    url = settings.redis_url.get_secret_value()
    found: list[str] = []
    password = urlsplit(url.split(";")[0]).password
    if password:
        # Masked as written in the URL, decoded (what Redis receives) and re-encoded.
        found += [url, password, unquote(password), quote(unquote(password), safe="")]
    found += settings.redis_target.secrets()  # a Sentinel URL's other passwords too
    for name in ("operator_keys", "api_keys"):
        found += [k.get_secret_value() for k in getattr(settings, name, [])]
    if settings.node_token is not None:
        found.append(settings.node_token.get_secret_value())
    return found


def _warn_short_secrets(settings: BrokerSettings) -> None:
    for warning in settings.short_secrets():
        logging.getLogger("modelfleet").warning(warning)


def _environment_keys() -> list[str]:
    """API keys in this process's environment, masked in its log even where its settings did not take them: a key a
    caller sends as a model id would otherwise reach the worker's log in the text of the job's reply."""
    names = ("MODELFLEET_OPERATOR_KEYS", "MODELFLEET_API_KEYS")
    return [part.strip() for name in names for part in os.environ.get(name, "").split(",") if part.strip()]


def cmd_api(args: argparse.Namespace) -> int:
    from api.app import create_app
    from api.server import serve
    from api.settings import ApiSettings

    try:
        settings = ApiSettings(**_given(args, "host", "port", "redis_url"))
        configure_logging(_secrets_of(settings))
        _warn_short_secrets(settings)
        app = create_app(settings)
    except ValidationError as exc:
        return _settings_error(exc)
    except ValueError as exc:
        print(f"modelfleet api: {exc}", file=sys.stderr)
        return 2
    serve(
        app,
        host=settings.host,
        port=settings.port,
        graceful_timeout=args.graceful_timeout,
        ping_interval=settings.sse_ping_interval,
        access_log=settings.access_log,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run_worker
    from workers.settings import WorkerSettings

    names: tuple[str, ...] = ("name", "models_dir", "state_dir", "concurrency", "threads", "memory_budget")
    names += ("redis_url", "lib", "serve_port", "serve_host", "advertise_url", "max_queue", "keep_alive", "preload")
    names += ("backend", "stream_interval")
    fields = _given(args, *names)
    if args.no_serve:
        fields["serve"] = False
    try:
        settings = WorkerSettings(**fields)
    except ValidationError as exc:
        return _settings_error(exc)
    configure_logging(_secrets_of(settings) + _environment_keys())
    _warn_short_secrets(settings)
    return run_worker(settings)


def cmd_flower(args: argparse.Namespace) -> int:
    from modelfleet.flower import FlowerSettings, flower_secrets, run_flower

    fields = {f"flower_{k}": v for k, v in _given(args, "port", "address").items()} | _given(args, "redis_url")
    try:
        settings = FlowerSettings(**fields)
    except ValidationError as exc:
        return _settings_error(exc)
    configure_logging(_secrets_of(settings) + flower_secrets(settings))
    return run_flower(settings)


def cmd_up(args: argparse.Namespace) -> int:
    from modelfleet.up import run_up

    return run_up(args)


REDIS_HELP = "the Redis URL (default: $MODELFLEET_REDIS_URL, else .modelfleet/keys here, else redis://127.0.0.1:6379/0)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = add_command(sub, "up", "run Redis (embedded unless --redis-url), the API and one local worker")
    up.add_argument("--host", default="127.0.0.1", help="the API's address (default: %(default)s)")
    up.add_argument("--port", type=int, default=8000, help="the API's port (default: %(default)s)")
    up.add_argument(
        "--redis-url",
        help="use this Redis instead of an embedded one (default: embedded, with the URL kept in .modelfleet/keys)",
    )
    up.add_argument("--models-dir", default="models", help="the local node's models (default: ./%(default)s)")
    up.add_argument("--memory-budget", help="the local node's memory budget, e.g. 8GiB (default: 75%% of RAM)")
    up.add_argument(
        "--serve-port", type=int, default=0, help="the local node's inference port (default: 0, a free one)"
    )
    up.set_defaults(func=cmd_up)

    api = add_command(sub, "api", "run the REST head")
    api.add_argument("--host", help="address to listen on (default: $MODELFLEET_HOST, else 127.0.0.1)")
    api.add_argument("--port", type=int, help="port to listen on (default: $MODELFLEET_PORT, else 8000)")
    api.add_argument("--redis-url", help=REDIS_HELP)
    api.add_argument(
        "--graceful-timeout",
        type=float,
        default=5.0,
        help="seconds open requests get on shutdown (default: %(default)s)",
    )
    api.set_defaults(func=cmd_api)

    worker = add_command(sub, "worker", "run one node: a Celery worker consuming only its own queue")
    worker.add_argument("--name", help="the node's name; %%h is replaced by the hostname, e.g. gpu-%%h (default: node)")
    worker.add_argument("--models-dir", help="where its .gguf files are (default: ./models)")
    worker.add_argument("--state-dir", help="where the node key lives (default: ./.modelfleet/nodes/NAME)")
    worker.add_argument("--concurrency", type=int, help="jobs it runs at once (default: 16)")
    worker.add_argument("--threads", type=int, help="CPU threads per model, never -1 (default: half the CPUs, 1 to 4)")
    worker.add_argument("--memory-budget", help="bytes its models may take, e.g. 8GiB (default: 75%% of RAM)")
    worker.add_argument(
        "--lib",
        choices=["auto", "cuda", "avx2", "avx", "basic"],
        help="ctransformers build (default: auto, CUDA when a GPU and its runtime are present, else the best CPU one)",
    )
    worker.add_argument(
        "--backend",
        help="auto (default: per model from its GGUF header), ctransformers or llama-cpp (MODELFLEET_BACKEND)",
    )
    worker.add_argument("--redis-url", help=REDIS_HELP)
    worker.add_argument(
        "--serve-port", type=int, help="inference endpoint port (default: 8081, or a free one if taken; 0: a free one)"
    )
    worker.add_argument("--serve-host", help="address it listens on (default: 127.0.0.1; 0.0.0.0 for other hosts)")
    worker.add_argument(
        "--advertise-url", help="its base URL for the head and clients, e.g. http://%%h:8081 (default: from the port)"
    )
    worker.add_argument("--no-serve", action="store_true", help="serve no inference endpoint (default: serve one)")
    worker.add_argument("--max-queue", type=int, help="generations that may wait per model (default: 8)")
    worker.add_argument(
        "--stream-interval",
        type=float,
        help="seconds between a stream's writes after its first token; faster tokens go out together "
        "(default: 0.01; 0: every token on its own)",
    )
    worker.add_argument(
        "--keep-alive", type=float, help="seconds unused before a model unloads itself (default: never)"
    )
    worker.add_argument("--preload", help="model ids to load at start, comma-separated (default: none)")
    worker.set_defaults(func=cmd_worker)

    flower = add_command(sub, "flower", "run the Flower dashboard: basic auth (MODELFLEET_FLOWER_AUTH), read-only")
    flower.add_argument("--port", type=int, help="port to listen on (default: $MODELFLEET_FLOWER_PORT, else 5555)")
    flower.add_argument("--address", help="address to listen on (default: $MODELFLEET_FLOWER_ADDRESS, else 127.0.0.1)")
    flower.add_argument("--redis-url", help=REDIS_HELP)
    flower.set_defaults(func=cmd_flower)

    add_commands(sub)  # nodes, ps, load, unload, events: the operator commands, over the API
    return parser


def _version() -> str:
    try:
        return version("modelfleet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
