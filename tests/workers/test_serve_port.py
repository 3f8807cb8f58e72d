"""Where the node's inference endpoint listens: the default port, or a free one, and a clear refusal."""

import contextlib
import socket

import pytest

from workers.inference.server import DEFAULT_PORT, bind


def test_a_given_port_that_is_taken_is_refused_by_name() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*--serve-port"):
            bind("127.0.0.1", port)


def test_the_default_port_gives_way_to_a_free_one_when_taken() -> None:
    holder = socket.socket()
    with contextlib.suppress(OSError):  # someone else may hold it already: taken either way
        holder.bind(("127.0.0.1", DEFAULT_PORT))
        holder.listen()
    try:
        sock = bind("127.0.0.1", None)
        assert sock.getsockname()[1] != DEFAULT_PORT
        sock.close()
    finally:
        holder.close()
