"""A minimal HTTP/1.1 keep-alive client on an asyncio Protocol, for load generation.

The load generator shares the machine's cores with the server it measures, so each request must
cost the client as little as possible: the request bytes are built once, and a response is
parsed only as far as its status and length (status line, Content-Length or chunked framing).
One `Connection` carries one request at a time (no pipelining), as a browser or SDK would.
Measured here against aiohttp on the same server: see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast
from urllib.parse import urlsplit

from slimserve.errors import InvalidArgument, Unavailable

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_CHUNKED = b"\r\ntransfer-encoding: chunked"


class ProtocolError(ConnectionError):
    """The server's answer was not HTTP/1.1 we can frame."""


def parse_http_url(url: str) -> tuple[str, int]:
    """'http://host:port' -> (host, port); only plain http (the benchmark runs on loopback)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidArgument(f"--url {url!r}: give an http URL like http://127.0.0.1:8000")
    if parts.path not in ("", "/"):
        raise InvalidArgument(f"--url {url!r}: give only scheme, host and port, no path")
    return parts.hostname, parts.port or 80


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The full bytes of one request, built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _chunked_end(buf: bytearray, start: int) -> tuple[int, bytes] | None:
    """Frame a chunked body starting at `start`; (end offset, body) once complete, else None."""
    pos, parts = start, list[bytes]()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            # The last chunk, then optional trailers, then an empty line.
            end = buf.find(_HEAD_END, eol)
            return None if end < 0 else (end + 4, b"".join(parts))
        data_end = eol + 2 + size
        if len(buf) < data_end + 2:
            return None
        parts.append(bytes(buf[eol + 2 : data_end]))
        pos = data_end + 2


def _headers(head: bytes) -> dict[str, str]:
    pairs = (line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    return {k.strip().decode("latin-1"): v.strip().decode("latin-1") for k, v in pairs}


class Connection(asyncio.Protocol):
    """One keep-alive connection; `request(raw)` returns (status, body) of the answer."""

    def __init__(self, keep_body: bool = False) -> None:
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        # The load loop needs only the status; probes keep the body to check it.
        self.keep_body = keep_body
        self.last_headers: dict[str, str] = {}  # lower-cased names; filled only with keep_body

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a request is one write, but never wait on Nagle for it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            self._try_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("server closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)
        self._transport = None

    # framing
    def _try_complete(self) -> None:
        buf = self._buf
        head_end = buf.find(_HEAD_END)
        if head_end < 0:
            return
        if buf[:5] != b"HTTP/":
            self._fail(ProtocolError(f"not an HTTP response: {bytes(buf[:40])!r}"))
            return
        status = int(buf[9:12])
        head = bytes(buf[:head_end]).lower()
        body_start = head_end + 4
        at = head.find(_CONTENT_LENGTH)
        if at >= 0:
            eol = head.find(b"\r\n", at + 2)
            length = int(head[at + len(_CONTENT_LENGTH) : eol if eol > 0 else None])
            end = body_start + length
            if len(buf) < end:
                return
            body = bytes(buf[body_start:end]) if self.keep_body else b""
        elif head.find(_CHUNKED) >= 0:
            framed = _chunked_end(buf, body_start)
            if framed is None:
                return
            end, body = framed
        elif status in (204, 304) or 100 <= status < 200:
            end, body = body_start, b""
        else:
            self._fail(ProtocolError("response without Content-Length or chunked framing"))
            return
        if self.keep_body:
            self.last_headers = _headers(head)
        del buf[:end]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self._transport is not None:
            self._transport.close()

    # use
    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send pre-built request bytes; wait for the whole response; (status, body)."""
        if self._transport is None:
            raise self._lost or ConnectionResetError("connection is closed")
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._transport.write(raw)
        if self._buf:  # bytes that arrived before we asked (unlikely): frame them now
            self._try_complete()
        return await waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def connect(host: str, port: int, keep_body: bool = False) -> Connection:
    """Open one connection; Unavailable with a hint when nothing listens there."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(lambda: Connection(keep_body), host, port)
    except OSError as exc:
        raise Unavailable(
            f"cannot connect to http://{host}:{port} ({exc.strerror or exc}); "
            "is the server running there? Start it with `slimserve serve` or fix --url"
        ) from None
    return conn
