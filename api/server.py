"""Serving the app with uvicorn so that a stop (SIGTERM, Ctrl-C) ends the event streams too.

uvicorn waits for open responses before it shuts down, and an SSE stream never ends by itself; its
`timeout_graceful_shutdown` would then cut every stream mid-write. Instead, the first exit signal ends each
stream cleanly (its client reconnects elsewhere with its last id), and the timeout stays a backstop.
"""

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("modelfleet.api")


class Server(uvicorn.Server):
    """uvicorn's server, closing the app's event streams when asked to exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        relay = getattr(self._app.state, "relay", None)
        if relay is not None and self._loop is not None and not self.should_exit:
            log.info("stopping: closing %d event streams", relay.clients)
            self._loop.call_soon_threadsafe(relay.close_all)
        super().handle_exit(sig, frame)


SEND_BUFFER = 256 * 1024
"""Kernel send buffer of each connection (the kernel doubles it). Autotuning lets it grow to 4 MiB: what a client
that stopped reading its event stream would hold until the write deadline drops it. Plenty for any answer."""


def listening_socket(config: uvicorn.Config, *, dead_peer_after: float) -> socket.socket:
    """uvicorn's bound socket for `config`, with TCP_USER_TIMEOUT and keep-alive set so that every accepted
    connection inherits them: a peer that vanished without closing (a laptop lid shut, a cable pulled) leaves
    its event stream's pings unacknowledged, and the kernel drops the connection `dead_peer_after` seconds
    later instead of retransmitting for a quarter of an hour."""
    sock = config.bind_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_peer_after * 1000))
    return sock


def serve(
    app: FastAPI,
    *,
    host: str,
    port: int,
    graceful_timeout: float | None,
    ping_interval: float,
    access_log: bool = False,
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=int(graceful_timeout) if graceful_timeout is not None else None,
        access_log=access_log,
        log_config=None,  # our root handler, with its secret mask, formats uvicorn's records too
    )
    sock = listening_socket(config, dead_peer_after=max(2 * ping_interval, 5.0))
    Server(config, app).run(sockets=[sock])
