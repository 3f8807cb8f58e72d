"""The API's listening socket: accepted connections inherit the options that end a vanished peer's stream."""

import socket

import pytest
import uvicorn

from api.server import listening_socket


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
def test_accepted_connections_inherit_user_timeout_and_keepalive() -> None:
    listener = listening_socket(uvicorn.Config(app=None, host="127.0.0.1", port=0), dead_peer_after=30)
    try:
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        listener.close()
