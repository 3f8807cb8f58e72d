"""A client that stops reading its event stream is dropped by the API's own write deadline: counted, logged,
and long before TCP would give up on it."""

import socket
import time

from broker.events import EventBus, model_event
from tests.conftest import READ_KEY, Fleet, wait_for
from tests.e2e.test_events import FAKE_NODE, fake_model


def test_a_client_that_stops_reading_is_dropped_by_the_write_deadline(fleet: Fleet) -> None:
    # A mailbox far larger than the burst: only the write deadline can drop this client.
    api = fleet.api(MODELFLEET_SSE_QUEUE_SIZE="100000", MODELFLEET_SSE_WRITE_TIMEOUT="1")
    host, port = api.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the stall shows sooner
    sock.connect((host, int(port)))
    sock.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_KEY}\r\n\r\n".encode())
    head = sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    # From here on the client reads nothing. Events big enough to fill its window and our buffers.
    pipe = fleet.redis.client().pipeline(transaction=False)
    bus = EventBus(pipe)
    for i in range(4000):
        model = fake_model(i).model_copy(update={"id": f"m{i}-" + "x" * 100, "path": "/models/" + "p" * 300})
        bus.publish(model_event("model-loaded", FAKE_NODE, model))
    pipe.execute()
    published = time.monotonic()

    with api.client() as http:

        def stalled() -> bool:
            return "modelfleet_sse_clients_stalled_total 1.0" in http.get("/metrics").text

        wait_for(stalled, 30, "the stalled client to be dropped")
        print(f"\nstalled SSE client dropped {time.monotonic() - published:.1f}s after the burst (deadline 1 s)")
        assert "modelfleet_sse_clients 0.0" in http.get("/metrics").text
    assert "stopped reading" in api.log()
    assert "Exception in ASGI application" not in api.log()
    sock.close()
