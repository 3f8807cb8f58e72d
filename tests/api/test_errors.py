"""An unexpected error is answered as a 500 in the usual shape, and the keep-alive connection stays usable."""

import socket
import threading
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from api.errors import install_error_handlers
from tests.conftest import free_port, wait_for


@pytest.fixture
def server() -> Iterator[int]:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    port = free_port()
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    wait_for(lambda: served.started, 10, "uvicorn to start")
    yield port
    served.should_exit = True
    thread.join(10)


def _exchange(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {head!r}"
        head += chunk
    header, _, body = head.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(4096)
    return header + b"\r\n\r\n" + body


def test_a_500_keeps_the_connection_for_the_next_request(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        first = _exchange(sock, "/boom")
        assert first.startswith(b"HTTP/1.1 500") and b'"code":"internal_error"' in first
        assert b"a bug" not in first and b"connection: close" not in first.lower()
        second = _exchange(sock, "/fine")  # on the same socket
        assert second.startswith(b"HTTP/1.1 200") and second.endswith(b'{"ok":true}')
