"""The operator commands, on top of `modelfleet.client`: `nodes`, `ps`, `models`, `load`, `unload`, `events`,
`run`.

They talk to a running API: `--url` / `--key`, else MODELFLEET_URL / MODELFLEET_KEY. Tables and results go
to stdout; errors, with the API's message and code, and notes (an offline node) go to stderr. Exit status:
0 done, 1 failed, 2 bad usage or input, 3 key refused (401/403), 4 node or model not found, 5 API unreachable.
"""

import argparse
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO, TypeAlias

from broker.events import ModelEvent, NodeEvent, Snapshot, UsageEvent
from broker.schemas import ModelInfo, ModelState, NodeInfo
from modelfleet.client import (
    Client,
    ModelfleetAPIError,
    ModelfleetClientError,
    ModelfleetConnectionError,
    NodeReferenceError,
    pick_node,
)
from modelfleet.sse import StreamEvent
from modelfleet.state import STATE_FILE, read_state

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5

_USAGE_CODES = {"invalid_request", "invalid_model_id", "ambiguous_node", "invalid_url"}


def exit_status(error: ModelfleetClientError) -> int:
    if isinstance(error, ModelfleetConnectionError):
        return EXIT_UNREACHABLE
    if error.code in _USAGE_CODES:
        return EXIT_USAGE
    if isinstance(error, NodeReferenceError):
        return EXIT_NOT_FOUND
    if isinstance(error, ModelfleetAPIError):
        if error.status in (401, 403):
            return EXIT_AUTH
        if error.status == 404:
            return EXIT_NOT_FOUND
    return EXIT_ERROR


# Human-readable figures.


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """`0.4s`, `12s`, `3m05s`, `2h05m`, `3d04h`: two units at most."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{human_duration(seconds)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Left-aligned columns two spaces apart, `ollama ps` style."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in (headers, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


@contextmanager
def spinner(text: str, stream: TextIO) -> Iterator[None]:
    """A spinner with the elapsed time while the block runs, on a terminal only; elsewhere, nothing."""
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def spin() -> None:
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            stream.write(f"\r\033[K{frame} {text} {human_duration(time.monotonic() - started)}")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")
        stream.flush()

    thread = threading.Thread(target=spin, name="modelfleet-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# The commands. Each takes its parsed arguments and a connected client, and returns the exit status.


def node_label(node: NodeInfo, nodes: Sequence[NodeInfo] = ()) -> str:
    """The node's name, with the start of its fingerprint if another node shares the name."""
    shared = sum(n.name == node.name for n in nodes) > 1
    return f"{node.name} ({node.fingerprint[:8]})" if shared else node.name


def cmd_nodes(args: argparse.Namespace, client: Client) -> int:
    nodes = sorted(client.nodes(), key=lambda n: (not n.online, n.name, n.fingerprint))
    if not nodes:
        print("No node has registered yet: start one with `modelfleet worker`.", file=sys.stderr)
        return 0
    rows = [
        [
            n.name,
            n.fingerprint,
            "online" if n.online else "offline",
            str(n.models_loaded) if n.online else "-",
            f"{human_bytes(n.memory_used_bytes)} / {human_bytes(n.memory_budget_bytes)}" if n.online else "-",
            n.hostname,
            ago(n.seconds_since_heartbeat),
        ]
        for n in nodes
    ]
    table(
        ["NAME", "FINGERPRINT", "STATUS", "MODELS", "MEMORY (USED / BUDGET)", "HOST", "LAST HEARTBEAT"],
        rows,
        sys.stdout,
    )
    return 0


def _model_row(label: str, model: ModelInfo, now: datetime) -> list[str]:
    notes = ["pinned"] if model.pinned else []
    if model.state is ModelState.LOADED and not model.healthy:  # the head routes to it only once healthy
        notes.append("checking" if model.checking else "unhealthy")
    state = model.state.value + (f" ({', '.join(notes)})" if notes else "")
    loaded_for = (now - model.loaded_at).total_seconds() if model.loaded_at else None
    context = str(model.context_length) if model.context_length else "default"
    size, age = human_bytes(model.size_bytes), human_duration(loaded_for)
    return [label, model.id, state, model.backend or "-", size, context, age]


def cmd_ps(args: argparse.Namespace, client: Client) -> int:
    if args.node:
        nodes = [client.resolve_node(args.node)]
        everyone = nodes
    else:
        everyone = client.nodes()
        nodes = sorted((n for n in everyone if n.online), key=lambda n: (n.name, n.fingerprint))
    rows: list[list[str]] = []
    notes: list[str] = []
    now = datetime.now(UTC)
    for node in nodes:
        label = node_label(node, everyone)
        try:
            models = client.node_models(node.fingerprint)
        except ModelfleetAPIError as exc:
            if args.node:  # the one node asked for: its error is the answer
                raise
            notes.append(f"{label}: {exc.message} ({exc.code})")
            continue
        rows += [_model_row(label, m, now) for m in sorted(models, key=lambda m: m.id)]
        notes += [f"{label}: {m.id} failed: {m.error}" for m in models if m.error]
    if not args.node:
        notes += [
            f"{node_label(n, everyone)} ({n.fingerprint}) is offline; last heartbeat {ago(n.seconds_since_heartbeat)}"
            for n in everyone
            if not n.online
        ]
    if rows:
        table(["NODE", "MODEL", "STATE", "BACKEND", "SIZE", "CONTEXT", "LOADED FOR"], rows, sys.stdout)
    elif nodes:
        where = ", ".join(node_label(n, everyone) for n in nodes)
        print(f"No models loaded on {where}; `modelfleet models` lists what can be loaded.", file=sys.stdout)
    else:
        print("No node is online.", file=sys.stdout)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace, client: Client) -> int:
    """What each online node (or NODE) can load: its model files, with their size, estimate and state there."""
    everyone = client.nodes()
    wanted = {client.resolve_node(args.node).fingerprint} if args.node else {n.fingerprint for n in everyone}
    labels = {n.fingerprint: node_label(n, everyone) for n in everyone}
    files, status = client.pool_models(), client.pool_status()
    rows: list[list[str]] = []
    notes: list[str] = []
    for model in sorted(files.data, key=lambda m: m.id):
        for fp in sorted(set(model.nodes) & wanted, key=lambda f: labels.get(f, f)):
            states = {m.id: m for m in (status.nodes[fp].models or [])} if fp in status.nodes else {}
            held = states.get(model.id)
            state = held.state.value if held is not None else "unloaded"
            estimate = human_bytes(model.estimate_bytes) if model.problem is None else "unloadable"
            rows.append([labels.get(fp, fp[:12]), model.id, human_bytes(model.size_bytes), estimate, state])
            if model.problem:
                notes.append(f"{labels.get(fp, fp[:12])}: {model.id} cannot be loaded: {model.problem}")
    notes += [f"{labels.get(f.node, f.node[:12])}: {f.error} ({f.code})" for f in files.errors if f.node in wanted]
    if rows:
        table(["NODE", "MODEL", "SIZE", "ESTIMATE", "STATE"], rows, sys.stdout)
    else:
        print("No online node has a .gguf model file in its models directory.", file=sys.stdout)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def model_id(text: str) -> str:
    """A model as a person names it: its id, or its file name (`demo-tiny.gguf`)."""
    return text.removesuffix(".gguf")


def cmd_load(args: argparse.Namespace, client: Client) -> int:
    args.model = model_id(args.model)
    node = client.resolve_node(args.node)
    label = node_label(node)
    with spinner(f"Loading {args.model} on {label}", sys.stderr):
        started = time.monotonic()
        result = client.load(
            node.fingerprint, args.model, context_length=args.ctx, gpu_layers=args.gpu_layers, backend=args.backend
        )
        elapsed = time.monotonic() - started
    if result.already_loaded:
        print(f"{args.model} was already loaded on {label}.")
    else:
        print(f"Loaded {args.model} on {label} in {human_duration(elapsed)}.")
    if result.evicted:
        print(f"Evicted {', '.join(result.evicted)} to make room.")
    return 0


def cmd_unload(args: argparse.Namespace, client: Client) -> int:
    args.model = model_id(args.model) if args.model else args.model
    node = client.resolve_node(args.node)
    label = node_label(node)
    if not args.all:
        client.unload(node.fingerprint, args.model)
        print(f"Unloaded {args.model} from {label}.")
        return 0
    result = client.unload_all(node.fingerprint)
    if result.unloaded:
        print(f"Unloaded {len(result.unloaded)} model(s) from {label}: {', '.join(result.unloaded)}.")
    elif not result.errors:
        print(f"Nothing was loaded on {label}.")
    for failure in result.errors:
        print(f"modelfleet: could not unload {failure.model_id}: {failure.error} ({failure.code})", file=sys.stderr)
    return EXIT_ERROR if result.errors else 0


class EventPrinter:
    """One readable line per event of the stream, with node names (learnt from the snapshot and node events)."""

    def __init__(self, names: dict[str, str], out: TextIO) -> None:
        self.names = names
        self.out = out

    def line(self, item: StreamEvent) -> str:
        event = item.data
        if isinstance(event, Snapshot):
            self.names |= {n.fingerprint: n.name for n in event.nodes}
            parts = [
                f"{n.name} {'online' if n.online else 'offline'}, {len(n.models)} model(s)"
                + "".join(f" [{m.id} {m.state.value}]" for m in sorted(n.models, key=lambda m: m.id))
                for n in sorted(event.nodes, key=lambda n: (n.name, n.fingerprint))
            ]
            return f"{_clock(event.at)}  snapshot  " + ("; ".join(parts) or "no node registered")
        if isinstance(event, NodeEvent):
            self.names[event.node] = event.name
            why = f" ({event.reason})" if event.reason else ""
            return f"{_clock(event.at)}  {event.name}  {event.type}{why}"
        if isinstance(event, ModelEvent):
            node = self.names.get(event.node, event.node[:12])
            detail = f"  {human_bytes(event.model.size_bytes)}" if event.type == "model-loaded" else ""
            if event.type == "model-checked":
                detail = "  healthy" if event.model.healthy else "  did not answer"
            if event.error:
                detail = f"  error: {event.error}"
            return f"{_clock(event.at)}  {node}  {event.type}  {event.model_id}{detail}"
        return f"{_clock(datetime.now(UTC))}  {item.kind}  (not understood by this version) {item.raw!r:.200}"

    def __call__(self, item: StreamEvent) -> None:
        if isinstance(item.data, UsageEvent):
            return  # a gauge, a line a second per busy node: not a change of the pool, so not for this log
        print(self.line(item), file=self.out, flush=True)


def _clock(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cmd_events(args: argparse.Namespace, client: Client) -> int:
    nodes = client.nodes()
    node = pick_node(nodes, args.node).fingerprint if args.node else None
    printer = EventPrinter({n.fingerprint: n.name for n in nodes}, sys.stdout)

    def retrying(error: ModelfleetClientError, delay: float) -> None:
        print(f"note: {error.message} Reconnecting in {human_duration(delay)}.", file=sys.stderr, flush=True)

    try:
        for item in client.events(node, last_event_id=args.since, on_retry=retrying):
            printer(item)
    except KeyboardInterrupt:
        return 0  # the way to stop following
    return 0


def cmd_run(args: argparse.Namespace, client: Client) -> int:
    """Stream the model's answer to the terminal as it is generated, through the head."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    if args.chat:
        pieces = client.stream(args.model, messages=[{"role": "user", "content": prompt}], **options)
    else:
        pieces = client.stream(args.model, prompt, **options)
    wrote = ""
    try:
        for text in pieces:
            sys.stdout.write(text)
            sys.stdout.flush()
            wrote = text
    finally:
        if wrote and not wrote.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


# Wiring into `modelfleet`'s parser.

Command = Callable[[argparse.Namespace, Client], int]


def _setting(flag: str | None, name: str, state: dict[str, str]) -> tuple[str | None, str]:
    """A connection setting and where it came from: the flag, the environment, then `up`'s keys file here."""
    if flag:
        return flag, "--" + name.removeprefix("MODELFLEET_").lower()
    if os.environ.get(name):
        return os.environ[name], name
    if state.get(name):
        return state[name], f"{name} in {STATE_FILE}"
    return None, name


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        state = read_state(STATE_FILE)
        url, _ = _setting(args.url, "MODELFLEET_URL", state)
        key, key_from = _setting(args.key, "MODELFLEET_KEY", state)
        try:
            with Client(url, key) as client:
                return command(args, client)
        except ModelfleetClientError as exc:
            status = f", HTTP {exc.status}" if isinstance(exc, ModelfleetAPIError) else ""
            print(f"modelfleet: {exc.message} ({exc.code}{status})", file=sys.stderr)
            if isinstance(exc, ModelfleetAPIError) and exc.status == 401:
                hint = f"the key from {key_from} was refused" if key else "pass --key or set MODELFLEET_KEY"
                print(f"modelfleet: {hint}", file=sys.stderr)
            return exit_status(exc)
        except KeyboardInterrupt:
            print("modelfleet: interrupted; a job already sent still runs on its node", file=sys.stderr)
            return 130

    return run


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(sub: Subcommands, name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A `modelfleet` subcommand whose `--help` opens with what it does: the line `modelfleet --help` lists."""
    return sub.add_parser(name, help=text, description=text, **kwargs)


def add_commands(sub: Subcommands) -> None:
    """Add `nodes`, `ps`, `models`, `load`, `unload`, `events` and `run` to the `modelfleet` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help="the API's URL (default: $MODELFLEET_URL, else .modelfleet/keys here, else http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--key",
        help="an API key (default: $MODELFLEET_KEY, else .modelfleet/keys here; prefer these: flags show in ps)",
    )

    nodes = add_command(sub, "nodes", "list every registered node", parents=[common])
    nodes.set_defaults(func=_run(cmd_nodes))

    ps = add_command(sub, "ps", "list the models on every online node, or on NODE", parents=[common])
    ps.add_argument("node", nargs="?", metavar="NODE", help="a fingerprint, a unique prefix of one, or a name")
    ps.set_defaults(func=_run(cmd_ps))

    models = add_command(
        sub, "models", "list what every online node (or NODE) can load: size, estimate, state", parents=[common]
    )
    models.add_argument("node", nargs="?", metavar="NODE", help="a fingerprint, a unique prefix of one, or a name")
    models.set_defaults(func=_run(cmd_models))

    node_help = "a fingerprint, a unique prefix of one, or a name"
    model_help = "the model's id (its path in the models dir without .gguf) or its file name, e.g. demo-tiny.gguf"
    load = add_command(sub, "load", "load MODEL on NODE and wait until it is loaded", parents=[common])
    load.add_argument("node", metavar="NODE", help=node_help)
    load.add_argument("model", metavar="MODEL", help=model_help)
    load.add_argument("--ctx", type=int, metavar="N", help="context length (default: the model's own)")
    load.add_argument(
        "--gpu-layers", type=int, metavar="N", help="layers to offload to the GPU, -1: all (default: none)"
    )
    load.add_argument(
        "--backend", metavar="NAME", help="ctransformers or llama-cpp (default: the node's choice for the file)"
    )
    load.set_defaults(func=_run(cmd_load))

    unload = add_command(sub, "unload", "unload MODEL (or --all) from NODE", parents=[common])
    unload.add_argument("node", metavar="NODE", help=node_help)
    unload.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    unload.add_argument("--all", action="store_true", help="unload every model on the node (default: off)")
    run_unload = _run(cmd_unload)

    def checked_unload(args: argparse.Namespace) -> int:
        if bool(args.model) == args.all:
            unload.error("give either MODEL or --all")
        return run_unload(args)

    unload.set_defaults(func=checked_unload)

    events = add_command(sub, "events", "follow the pool's changes live, one line per event", parents=[common])
    events.add_argument(
        "--node", metavar="NODE", help="only this node's events, by fingerprint, prefix or name (default: all)"
    )
    events.add_argument(
        "--since", metavar="ID", help="replay the events after this event id first (default: from now on)"
    )
    events.set_defaults(func=_run(cmd_events))

    run = add_command(
        sub, "run", "run PROMPT on MODEL through the fleet and stream the answer as it is generated", parents=[common]
    )
    run.add_argument("model", metavar="MODEL", help="loaded on demand if no node has it loaded (when the API allows)")
    run.add_argument("prompt", metavar="PROMPT", help="text to continue (with --chat, to answer); - reads stdin")
    run.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message, through the chat template (default: continue it)",
    )
    run.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="at most N tokens (default 16 for a prompt, OpenAI's; with --chat, the rest of the context)",
    )
    run.add_argument("--temperature", type=float, metavar="T", help="0 always picks the most likely token (default 1)")
    run.add_argument("--seed", type=int, metavar="N", help="makes sampling repeatable (default: a new draw each run)")
    run.set_defaults(func=_run(cmd_run))
