"""The head's transport to nodes (aiohttp under httpx), against raw HTTP servers that misbehave on purpose:
chunks pass as they arrive, each failure is the httpx exception the proxy handles, and a response closed before
its end closes its connection (the node must see its caller leave)."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx
import pytest

from api.node_transport import NodeTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def client(**timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(10, **timeouts), transport=NodeTransport())


def test_each_chunk_passes_as_it_arrives_and_the_request_arrives_whole() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        release = asyncio.Event()
        seen: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await read_request(reader))
            writer.write(HEAD + chunk(b"data: first\n\n"))
            await writer.drain()
            await release.wait()  # the second chunk only once the client has the first
            writer.write(chunk(b"data: second\n\n") + chunk(b""))
            await writer.drain()
            writer.close()

        server, url = await serve(handler)
        async with server, await client() as http:
            request = http.build_request("POST", url + "/v1/completions", content=b'{"x": 1}', headers={"a": "b"})
            response = await http.send(request, stream=True)
            got = []
            async for part in response.aiter_raw():
                got.append(part)
                release.set()
            await response.aclose()
        return got, seen[0]

    got, request = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == [b"data: first\n\n", b"data: second\n\n"]
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\na: b\r\n" in request and request.endswith(b'\r\n\r\n{"x": 1}')


async def failure(handler: Handler, **timeouts: float) -> BaseException:
    server, url = await serve(handler)
    async with server, await client(**timeouts) as http:
        try:
            response = await http.send(http.build_request("POST", url, content=b"{}"), stream=True)
            async for _ in response.aiter_raw():
                pass
        except BaseException as exc:
            return exc
    raise AssertionError("no failure")


async def closes_before_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def closes_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(HEAD + chunk(b"data: part\n\n"))
    await writer.drain()
    writer.close()


async def answers_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"SMTP ready\r\n\r\n")
    await writer.drain()
    writer.close()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(30)


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (closes_before_answering, httpx.RemoteProtocolError),
        (closes_mid_body, httpx.RemoteProtocolError),
        (answers_garbage, httpx.RemoteProtocolError),
    ],
)
def test_a_broken_answer_is_httpxs_protocol_error(handler: Handler, expected: type[Exception]) -> None:
    exc = asyncio.run(asyncio.wait_for(failure(handler), 30))
    assert type(exc) is expected, repr(exc)


def test_a_silent_node_is_a_read_timeout() -> None:
    exc = asyncio.run(asyncio.wait_for(failure(never_answers, read=0.2), 30))
    assert type(exc) is httpx.ReadTimeout, repr(exc)


def test_a_refused_connection_is_a_connect_error() -> None:
    async def run() -> BaseException:
        server, url = await serve(closes_before_answering)
        server.close()
        await server.wait_closed()
        async with await client() as http:
            with pytest.raises(httpx.TransportError) as caught:
                await http.post(url, content=b"{}")
        return caught.value

    exc = asyncio.run(asyncio.wait_for(run(), 30))
    assert type(exc) is httpx.ConnectError, repr(exc)


def test_a_response_closed_early_closes_its_connection_and_one_read_to_its_end_is_reused() -> None:
    async def run() -> tuple[list[int], bool]:
        connections: list[int] = []
        left = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(0)
            while True:
                try:
                    request = await read_request(reader)
                except asyncio.IncompleteReadError:
                    left.set()  # the client closed the connection
                    return
                connections[-1] += 1
                if b"endless" in request:
                    writer.write(HEAD + chunk(b"data: token\n\n"))  # and never the end
                else:
                    writer.write(HEAD + chunk(b"data: all\n\n") + chunk(b""))
                await writer.drain()

        server, url = await serve(handler)
        async with server, await client() as http:
            for _ in range(2):  # read to their end: one connection for both
                assert (await http.post(url, content=b"{}")).content == b"data: all\n\n"
            response = await http.send(http.build_request("POST", url, content=b"endless"), stream=True)
            parts: AsyncIterator[bytes] = response.aiter_raw()
            assert await anext(parts) == b"data: token\n\n"
            await response.aclose()
            await asyncio.wait_for(left.wait(), 10)
        return connections, left.is_set()

    connections, left = asyncio.run(asyncio.wait_for(run(), 30))
    assert connections == [3] and left


def test_a_name_that_resolves_slowly_is_a_connect_timeout_of_the_connect_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connect timeout covers the name lookup (a node's endpoint is often a host name), not only the
    socket's connect: a stalled resolver must not hold a request for the much longer pool or read timeouts."""
    resolve = aiohttp.TCPConnector._resolve_host

    async def stalled(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(60)
        return await resolve(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_resolve_host", stalled)

    async def run() -> BaseException:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(60, connect=0.2, pool=60), transport=NodeTransport()
        ) as http:
            with pytest.raises(httpx.TransportError) as caught:
                await http.post("http://node.invalid:9/v1/completions", content=b"{}")
        return caught.value

    exc = asyncio.run(asyncio.wait_for(run(), 10))  # not the 60 s of the read or pool timeouts
    assert type(exc) is httpx.ConnectTimeout, repr(exc)
