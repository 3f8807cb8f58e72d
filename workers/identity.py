"""A node's identity: a random key kept in its state directory, and the fingerprint derived from it."""

import hashlib
import os
import secrets
from pathlib import Path

KEY_FILE = "node.key"


def load_or_create_node_key(state_dir: Path) -> bytes:
    """The node's secret key, created (mode 0600) on first start and reused on every restart."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise ValueError(f"{path} is not a modelfleet node key; move it away to give this node a new identity") from exc
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def fingerprint(key: bytes) -> str:
    """Stable for a key, unique between keys; never reveals the key."""
    return hashlib.sha256(b"modelfleet-node:" + key).hexdigest()[:32]
