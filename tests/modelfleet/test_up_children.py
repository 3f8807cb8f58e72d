"""`up`'s children get the default Ctrl-C handling even when `up` itself was started with SIGINT ignored."""

import signal
import sys

from modelfleet.up import Supervisor
from tests.conftest import wait_for

PROBE = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)"


def test_children_of_up_handle_sigint_even_if_up_was_started_ignoring_it() -> None:
    lines: list[str] = []
    sup = Supervisor()
    sup.say = lines.append  # type: ignore[method-assign]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup modelfleet up &` starts it
    try:
        child = sup.start("probe", [sys.executable, "-c", PROBE], {})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.wait(30) == 0
    wait_for(lambda: lines, 30, "the child's line")
    sup.stop_all()
    # Python installs its KeyboardInterrupt handler only when SIGINT was not ignored at its start.
    assert [line.strip() for line in lines] == ["probe | True"]
