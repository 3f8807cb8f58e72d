"""The operator commands (`modelfleet nodes | ps | load | unload | events`) run as an operator runs them: subprocesses
against a running fleet, with MODELFLEET_URL / MODELFLEET_KEY in their environment."""

import importlib.util
import os
import pty
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.schemas import NodeInfo
from modelfleet.commands import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_USAGE
from modelfleet.up import default_signals
from tests.conftest import (
    ALL_SECRETS,
    OPERATOR_KEY,
    READ_KEY,
    Api,
    Fleet,
    Worker,
    free_port,
    modelfleet_command,
    register_gone_node,
)

pytestmark = pytest.mark.timeout(90)
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker("cli-node", models_dir)


@pytest.fixture(scope="module")
def ghost(module_fleet: Fleet) -> NodeInfo:
    return register_gone_node(module_fleet)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker, ghost: NodeInfo) -> Api:
    return module_fleet.api()


def environment(api: Api, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    env["MODELFLEET_URL"] = api.url
    if key is not None:
        env["MODELFLEET_KEY"] = key
    return env


def cli(api: Api, *args: str, key: str | None = OPERATOR_KEY) -> Run:
    done = subprocess.run(
        [*modelfleet_command(), *args],
        env=environment(api, key),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        preexec_fn=default_signals,
    )
    for secret in ALL_SECRETS:
        assert secret not in done.stdout + done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def clean(api: Api, node: Worker) -> None:
    assert cli(api, "unload", node.fingerprint, "--all").code == 0


def rows(table: str) -> list[list[str]]:
    """The table's rows below its header, split on runs of two or more spaces."""
    lines = table.strip().splitlines()
    assert lines and lines[0].startswith(("NAME", "NODE")), table
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]


def test_nodes(api: Api, node: Worker, ghost: NodeInfo) -> None:
    run = cli(api, "nodes")
    assert run.code == 0, run.err
    listed = {row[0]: row for row in rows(run.out)}
    assert listed["cli-node"][1:3] == [node.fingerprint, "online"]
    assert listed["ghost"][1:3] == [ghost.fingerprint, "offline"]
    assert re.search(r"\d B / 1?\d+\.\d [GT]iB", listed["cli-node"][4])  # used / budget, in human units


def test_load_ps_unload(api: Api, node: Worker, ghost: NodeInfo, clean: None) -> None:
    loaded = cli(api, "load", "cli-node", "tiny-a", "--ctx", "256")
    assert loaded.code == 0, loaded.err
    # Not a terminal: no spinner frames, one line when done.
    assert re.fullmatch(r"Loaded tiny-a on cli-node in \d+\.\ds\.\n", loaded.out) and loaded.err == ""
    assert cli(api, "load", "cli-node", "tiny-a").out == "tiny-a was already loaded on cli-node.\n"

    ps = cli(api, "ps")
    assert ps.code == 0, ps.err
    [row] = rows(ps.out)
    assert row[:4] == ["cli-node", "tiny-a", "loaded", "ctransformers"] and row[4].endswith("KiB") and row[5] == "256"
    assert re.fullmatch(r"\d+\.\ds|\d+s|\d+m\d\ds", row[6])  # a loaded model's age, however slow the machine
    assert f"ghost ({ghost.fingerprint}) is offline" in ps.err

    # A fingerprint prefix names the node; a load may name its backend.
    backend = "llama-cpp" if HAVE_LLAMA_CPP else "ctransformers"
    assert cli(api, "load", node.fingerprint[:7], "tiny-b", "--backend", backend).code == 0
    one = cli(api, "ps", node.fingerprint[:7])
    assert [r[1:4] for r in rows(one.out)] == [["tiny-a", "loaded", "ctransformers"], ["tiny-b", "loaded", backend]]
    assert "ghost" not in one.err
    unknown = cli(api, "load", "cli-node", "tiny-c", "--backend", "vllm")
    assert unknown.code != 0 and "Unknown backend 'vllm'" in unknown.err

    unloaded = cli(api, "unload", "cli-node", "tiny-a")
    assert unloaded.code == 0 and unloaded.out == "Unloaded tiny-a from cli-node.\n"
    everything = cli(api, "unload", node.fingerprint, "--all")
    assert everything.code == 0 and everything.out == "Unloaded 1 model(s) from cli-node: tiny-b.\n"
    empty = cli(api, "ps", "cli-node")
    assert (
        empty.code == 0 and empty.out == "No models loaded on cli-node; `modelfleet models` lists what can be loaded.\n"
    )


def test_errors_print_the_api_message_and_exit_non_zero(api: Api, node: Worker, ghost: NodeInfo) -> None:
    missing = cli(api, "load", "cli-node", "no-such-model")
    assert missing.code == EXIT_NOT_FOUND and missing.out == ""
    assert "no-such-model" in missing.err and "(model_file_not_found, HTTP 404)" in missing.err

    read_only = cli(api, "load", "cli-node", "tiny-a", key=READ_KEY)
    assert read_only.code == EXIT_AUTH and "read-only" in read_only.err and "(forbidden, HTTP 403)" in read_only.err

    anonymous = cli(api, "nodes", key=None)
    assert anonymous.code == EXIT_AUTH and "MODELFLEET_KEY" in anonymous.err

    # Flags win over the environment.
    assert cli(api, "ps", "--key", OPERATOR_KEY, key="wrong").code == 0
    unreachable = cli(api, "nodes", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.code == EXIT_UNREACHABLE and "Cannot reach the modelfleet API" in unreachable.err

    offline = cli(api, "load", "ghost", "tiny-a")
    assert offline.code == 1 and "offline" in offline.err and "(node_offline, HTTP 503)" in offline.err
    nobody = cli(api, "unload", "nobody", "tiny-a")
    assert nobody.code == EXIT_NOT_FOUND and "No node matches 'nobody'" in nobody.err
    assert cli(api, "unload", "cli-node").code == EXIT_USAGE
    assert cli(api, "nodes", "--url", "localhost:8000").code == EXIT_USAGE
    assert cli(api, "load", "cli-node", "../escape").code == EXIT_USAGE


def test_models_lists_what_each_node_can_load_and_load_takes_a_file_name(api: Api, node: Worker, clean: None) -> None:
    before = cli(api, "models")
    assert before.code == 0, before.err
    listed = {row[1]: row for row in rows(before.out) if row[0] == "cli-node"}
    assert {"tiny-a", "tiny-b", "org/nested", "broken"} <= set(listed) and "escape" not in listed
    assert (
        listed["tiny-b"][2].endswith("KiB")
        and listed["tiny-b"][3].endswith("KiB")
        and listed["tiny-b"][4] == "unloaded"
    )
    assert listed["broken"][3:] == ["unloadable", "unloaded"] and "cli-node: broken cannot be loaded:" in before.err

    loaded = cli(api, "load", "cli-node", "tiny-b.gguf")  # the file's name, as `ls models` shows it
    assert loaded.code == 0 and loaded.out.startswith("Loaded tiny-b on cli-node"), loaded.err
    after = {row[1]: row for row in rows(cli(api, "models", "cli-node").out)}
    assert after["tiny-b"][4] == "loaded" and after["tiny-a"][4] == "unloaded"
    assert cli(api, "unload", "cli-node", "tiny-b.gguf").code == 0


def test_version(api: Api) -> None:
    shown = cli(api, "--version")
    assert shown.code == 0 and re.fullmatch(r"modelfleet \d+\.\d+\.\d+\S*\n", shown.out), shown


def test_spinner_on_a_terminal(api: Api, node: Worker, clean: None) -> None:
    """On a TTY, stderr shows the spinner with the elapsed time, and clears it before the result."""
    main, tty = pty.openpty()
    try:
        done = subprocess.run(
            [*modelfleet_command(), "load", "cli-node", "tiny-c"],
            env=environment(api, OPERATOR_KEY),
            stdout=subprocess.PIPE,
            stderr=tty,
            stdin=subprocess.DEVNULL,
            timeout=60,
            preexec_fn=default_signals,
        )
        os.close(tty)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    assert done.returncode == 0 and done.stdout.startswith(b"Loaded tiny-c on cli-node")
    text = shown.decode()
    assert re.search(r"\r\x1b\[K. Loading tiny-c on cli-node \d+\.\ds", text)
    assert text.endswith("\r\x1b[K")


def follow_events(api: Api) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [*modelfleet_command(), "events", "--node", "cli-node"],
        env=environment(api, READ_KEY),  # following needs no operator key
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=default_signals,
    )


SNAPSHOT_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  snapshot  cli-node online, 0 model\(s\)\n"


def test_events_follows_the_pool_one_line_per_event(api: Api, node: Worker, clean: None) -> None:
    follow = follow_events(api)
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()
        assert re.fullmatch(SNAPSHOT_LINE, first)
        assert cli(api, "load", "cli-node", "tiny-a").code == 0
        assert cli(api, "unload", "cli-node", "tiny-a").code == 0
        lines = [follow.stdout.readline() for _ in range(5)]
    finally:
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=10)
    shown = [line.split("  ", 1)[1].rstrip("\n") for line in lines]
    assert shown[0] == "cli-node  model-loading  tiny-a"
    assert re.fullmatch(r"cli-node  model-loaded  tiny-a  \d+\.\d KiB", shown[1])
    assert shown[2:] == [
        "cli-node  model-checked  tiny-a  healthy",
        "cli-node  model-unloading  tiny-a",
        "cli-node  model-unloaded  tiny-a",
    ]
    assert follow.returncode == 0 and "Traceback" not in err  # Ctrl-C is how one stops following
    for secret in ALL_SECRETS:
        assert secret not in "".join(lines) + out + err


def test_ctrl_c_stops_events_even_when_the_test_run_ignores_it(api: Api, node: Worker, clean: None) -> None:
    """Under `nohup` or as a script's background job, pytest itself runs with SIGINT ignored; a child keeps an
    ignored signal ignored through exec, so the harness must give its children the default back."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the shell did to this test run
    try:
        follow = follow_events(api)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert follow.stdout is not None
        assert re.fullmatch(SNAPSHOT_LINE, follow.stdout.readline())
    finally:
        follow.send_signal(signal.SIGINT)
        try:
            _, err = follow.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            follow.kill()
            follow.communicate()
            raise AssertionError("`modelfleet events` ignored Ctrl-C: it inherited SIG_IGN") from None
    assert follow.returncode == 0 and "Traceback" not in err


def test_events_errors(api: Api) -> None:
    nobody = cli(api, "events", "--node", "nobody")
    assert nobody.code == EXIT_NOT_FOUND and "No node matches 'nobody'" in nobody.err
    anonymous = cli(api, "events", key="wrong")
    assert anonymous.code == EXIT_AUTH and "(unauthenticated, HTTP 401)" in anonymous.err
    # A key that is set but refused is named as such, not reported as missing.
    assert "the key from MODELFLEET_KEY was refused" in anonymous.err and "set MODELFLEET_KEY" not in anonymous.err
    flagged = cli(api, "events", "--key", "wrong-too", key=None)
    assert flagged.code == EXIT_AUTH and "the key from --key was refused" in flagged.err
    keyless = cli(api, "events", key=None)
    assert keyless.code == EXIT_AUTH and "pass --key or set MODELFLEET_KEY" in keyless.err
    unreachable = cli(api, "events", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.code == EXIT_UNREACHABLE
