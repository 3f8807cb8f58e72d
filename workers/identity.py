"""A node's identity: a random key kept in its state directory, and the fingerprint derived from it."""

import contextlib
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

KEY_FILE = "node.key"


KEY_BYTES = 32


def load_or_create_node_key(state_dir: Path) -> bytes:
    """The node's secret key, created (mode 0600) on first start and reused on every restart.

    The file appears whole or not at all: the key is written and synced to a file of its own, then linked into
    place (a link, unlike a rename, fails if another process linked theirs first; theirs is then used). Written
    in place, a full disk or a crash left an empty file, read back as the empty key: every node with such a file
    had the same fingerprint and took over the others' records. A key file that is not exactly one key is
    refused, with its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    fd, temporary = tempfile.mkstemp(dir=state_dir, prefix=f".{KEY_FILE}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:  # another process created it first: use theirs
            return _read(path)
        except OSError:  # a filesystem without hard links (some FUSE and SMB mounts): create it in place, synced
            _create(path, key)
            return _read(path)  # ours, or that of a process that was first
    finally:
        os.unlink(temporary)
    with contextlib.suppress(OSError):  # where a directory can be synced: the new name survives a crash
        directory = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return key


def _create(path: Path, key: bytes) -> None:
    """Write the key file in place, unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process's: the caller reads it
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        what = "is empty" if not text else "is not a modelfleet node key"
        raise ValueError(f"{path} {what}; move it away to give this node a new identity")
    return key


def fingerprint(key: bytes) -> str:
    """Stable for a key, unique between keys; never reveals the key."""
    return hashlib.sha256(b"modelfleet-node:" + key).hexdigest()[:32]
