"""A node's key file: made whole or not at all, the same for every process that races to make it."""

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workers.identity import KEY_BYTES, KEY_FILE, load_or_create_node_key


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key = load_or_create_node_key(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert len(key) == KEY_BYTES and path.read_text() == key.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_node_key(tmp_path / "state") == key
    assert [p.name for p in (tmp_path / "state").iterdir()] == [KEY_FILE], "no temporary file is left behind"


def test_processes_racing_to_make_it_all_get_the_same_key(tmp_path: Path) -> None:
    for attempt in range(20):
        state = tmp_path / f"state-{attempt}"
        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(load_or_create_node_key, [state] * 8))
        assert len(keys) == 1 and next(iter(keys)) == bytes.fromhex((state / KEY_FILE).read_text())


@pytest.mark.parametrize(("content", "words"), [("", "is empty"), ("\n", "is empty"), ("abcd\n", "not a modelfleet")])
def test_a_key_file_that_is_not_one_key_is_refused(tmp_path: Path, content: str, words: str) -> None:
    """An empty file (a write cut short by a full disk) was read as the empty key: one fingerprint for all."""
    (tmp_path / KEY_FILE).write_text(content)
    with pytest.raises(ValueError, match=words):
        load_or_create_node_key(tmp_path)


def test_without_hard_links_the_key_is_written_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*_: object) -> None:
        raise PermissionError("operation not permitted")  # what some FUSE and SMB mounts answer

    monkeypatch.setattr("workers.identity.os.link", no_links)
    key = load_or_create_node_key(tmp_path / "state")
    assert load_or_create_node_key(tmp_path / "state") == key and len(key) == KEY_BYTES
    assert [p.name for p in (tmp_path / "state").iterdir()] == [KEY_FILE]
