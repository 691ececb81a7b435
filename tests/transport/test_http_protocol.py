"""The HTTP protocol's coalescing transport: a response's head and body leave in one send."""

from __future__ import annotations

import asyncio
from typing import Any

from slimserve.transport.http_protocol import CoalescingTransport

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
