"""`modelfleet up`'s state directory, `./.modelfleet/`: what lets a restart, and any command run beside it, find
the same fleet.

    .modelfleet/              0700
      keys                    0600  `export NAME=value` lines: a shell can source it, and every modelfleet
                                    command run in this directory reads it as a dotenv file (below what the
                                    environment and flags say): MODELFLEET_URL, MODELFLEET_KEY (operator),
                                    MODELFLEET_OPERATOR_KEYS, MODELFLEET_API_KEYS (when `up` made them),
                                    MODELFLEET_REDIS_URL (with its password), MODELFLEET_NODE_TOKEN,
                                    MODELFLEET_FLOWER_AUTH, and MODELFLEET_UP_REDIS (embedded or external)
      up.lock                 0600  held (flock) by the running `up`, with its pid: one `up` per directory
      nodes/NAME/             node keys (workers/identity.py)
      redis/                  the embedded Redis's working directory

The keys file is written whole to a temporary file and renamed, so a reader never sees half of it.
"""

import contextlib
import fcntl
import os
import shlex
from pathlib import Path

from dotenv import dotenv_values

from broker.settings import STATE_DIR, STATE_FILE

__all__ = ["STATE_DIR", "STATE_FILE", "UpLock", "read_state", "write_state"]


def read_state(path: Path = STATE_FILE) -> dict[str, str]:
    """The keys file's variables; empty if there is none."""
    if not path.is_file():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def write_state(values: dict[str, str], path: Path = STATE_FILE) -> Path:
    """Replace the keys file with `values`, mode 0600 from its first byte."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = [
        "# modelfleet up's fleet. In a shell: . " + shlex.quote(str(path.resolve())),
        "# modelfleet commands run in this directory read it without that.",
        *(f"export {name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


class UpLock:
    """An exclusive `flock` on `up.lock`, held for the life of one `up` and released by the kernel when that
    process ends however it ends: a crashed `up` never leaves a stale lock behind."""

    def __init__(self, state_dir: Path = STATE_DIR) -> None:
        self.path = state_dir / "up.lock"
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of the `up` holding the lock now, without creating anything; None if nobody holds it."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(self.path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> int | None:
        """Take the lock and write our pid into it; if another `up` holds it, return that one's pid instead."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _read_pid(self.path) or -1
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None
