"""The HTTP protocol: a response's head and body leave in one send (coalescing transport), and
a graceful stop drains keep-alive connections instead of cutting them."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from slimserve.transport.http_protocol import CoalescingTransport, ConnectionLimits, protocol_class

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """Stands in for the socket transport: records each send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.sends.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _run(body: Any) -> Recorder:
    async def main() -> Recorder:
        sink = Recorder()
        await body(CoalescingTransport(sink, asyncio.get_running_loop()))  # type: ignore[arg-type]
        return sink

    return asyncio.run(main())


def test_head_and_body_go_out_in_one_send() -> None:
    async def body(t: CoalescingTransport) -> None:
        t.write(HEAD)
        t.write(b"{}")
        await asyncio.sleep(0)

    assert _run(body).sends == [HEAD + b"{}"]


def test_a_head_alone_is_sent_on_the_next_loop_turn() -> None:
    seen: list[list[bytes]] = []

    async def body(t: CoalescingTransport) -> None:
        t.write(HEAD)  # e.g. a stream whose first chunk is far off
        seen.append(list(t._transport.sends))  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t.write(b"data: 1\n\n")

    sink = _run(body)
    assert seen == [[]]
    assert sink.sends == [HEAD, b"data: 1\n\n"]


def test_close_flushes_a_held_head_and_other_calls_pass_through() -> None:
    async def body(t: CoalescingTransport) -> None:
        assert t.get_extra_info("peername") == "info:peername"
        t.write(b"not a head")
        t.write(HEAD)
        t.close()

    sink = _run(body)
    assert sink.sends == [b"not a head", HEAD]
    assert sink.closed


# -- graceful stop: keep-alive connections drain, none is cut under a client ---------------


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hi"})


REQUEST = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)
    return head.lower()


async def _until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


def test_a_graceful_stop_answers_the_next_request_with_close_and_closes_quiet_ones() -> None:
    """uvicorn closes an idle keep-alive connection at once when it stops, so a request its
    client sends just then is lost; here the next request is answered (Connection: close),
    a connection with no request is closed after drain_idle_s, and no new one is accepted."""

    async def main() -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        limits = ConnectionLimits(drain_idle_s=0.5)
        config = uvicorn.Config(_hello, http=protocol_class(limits), lifespan="off",
                                log_config=None, timeout_keep_alive=30)  # fmt: skip
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await _until(lambda: server.started)
        busy = await asyncio.open_connection("127.0.0.1", port)
        quiet = await asyncio.open_connection("127.0.0.1", port)
        assert b"connection: close" not in await _exchange(*busy)  # kept alive
        server.should_exit = True
        await _until(lambda: not server.servers[0].is_serving())  # the drain has begun
        await asyncio.sleep(0.2)
        last = await _exchange(*busy)  # uvicorn alone: reset, or closed with no answer
        assert last.startswith(b"http/1.1 200") and b"connection: close" in last
        assert await asyncio.wait_for(busy[0].read(), 5) == b""  # then closed
        assert await asyncio.wait_for(quiet[0].read(), 5) == b""  # idle: closed
        await asyncio.wait_for(task, 5)
        for _, writer in (busy, quiet):
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
