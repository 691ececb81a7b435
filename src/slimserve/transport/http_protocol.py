"""uvicorn's httptools protocol with deadlines and a header-size cap per connection.

Plain uvicorn arms no timer on a new connection and none while a request's headers or body
arrive (its keep-alive timer runs only between requests, and every byte received cancels
it), and httptools buffers headers without a bound. A client trickling one byte a second
could so hold a connection, and its memory, forever (slowloris). This protocol adds:

- a header deadline (settings.header_timeout_s) from a connection's start, and from the
  first byte of each later request, until the request's headers are complete;
- a body deadline (settings.body_timeout_s) from the headers until the body is complete;
- a cap (settings.max_header_bytes) on the request line plus headers, counted as they arrive
  (so a never-ending header is cut off) and exactly once they are complete.

A request over a deadline gets 408, one over the header cap 431, both with a JSON
{"error": ...} naming the flag that raises the limit, and the connection is closed.

A graceful stop (SIGTERM, a `--workers` reload) drains instead of cutting: uvicorn closes an
idle keep-alive connection at once, and a request its client had just sent (still unread in
the socket, or on the wire) then fails with a reset. Here an idle connection stays open for
its client's next request, which is answered with `Connection: close`; one that stays quiet
for `drain_idle_s` is closed then, as an idle timeout would.
Inference itself is never timed here: both deadlines end when the request is fully received.
Responses leave in one send: `CoalescingTransport` holds a head until its body is written.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slimserve.config import Settings

log = logging.getLogger("slimserve.http")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 32 * 1024
    # How long a connection idle at a graceful stop may stay open for its next request: a
    # client in a request loop sends within milliseconds; a quiet one sees a normal idle close.
    drain_idle_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing and answer `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """A protocol class bound to `limits`, for uvicorn.Config(http=...)."""
    return type("SlimserveHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


class LimitedHttpProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = True  # reading a request line and headers (or waiting for one)
        self._header_bytes = 0  # bytes received while in headers, this request
        self._begun = 0  # requests begun on this connection
        self._draining = False  # the server is stopping: answer with Connection: close
        self._head_begun = False  # a request line has arrived, its headers not all yet

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # One send per response instead of two: ~10% less server CPU per request (MLP,
        # 64 clients, v2 JSON; benchmarks/RESULTS.md).
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """A graceful stop (the server no longer accepts): the request in flight, or the
        next one on an idle connection, is the last, answered with `Connection: close`. A
        response already on its way stays keep-alive (its head is out): closing right after
        it would race the client's next request, so that request is the last instead."""
        self._draining = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                cycle.keep_alive = False
            return  # on_response_complete arms the drain timer if the connection stays
        if not self._head_begun:  # else a request is arriving: on_headers_complete marks it
            self._arm_drain()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining and self.timeout_keep_alive_task is not None:
            self._arm_drain()  # kept alive while draining: wait drain_idle_s, not keep-alive

    def _arm_drain(self) -> None:
        self._unset_keepalive_if_required()
        idle_s = min(self.timeout_keep_alive, self.limits.drain_idle_s)
        self.timeout_keep_alive_task = self.loop.call_later(idle_s, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.message)
            else:
                self._refuse(400, "invalid HTTP request")
            return
        except httptools.HttpParserError:
            self._refuse(400, "invalid HTTP request")
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # websockets are not served
            return
        if self._in_headers and self._begun == begun:
            # A chunk read wholly inside one request's headers is all header bytes. (One in
            # which a request began may also hold the end of the one before, so it is not
            # counted; what httptools buffers stays within the cap plus one chunk.)
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, self._header_message(self._header_bytes))

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun += 1
        self._head_begun = self._in_headers = True
        self._header_bytes = 0
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            raise _Refused(431, self._header_message(size))
        self._head_begun = self._in_headers = False
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()
        if self._draining:
            self.cycle.keep_alive = False  # the last request: its response says close

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # -- deadlines and refusals ------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if not self._in_headers and cycle is not None and cycle.response_started:
            self.transport.close()  # already answered (e.g. 401) while the body trickles
            return
        if self._in_headers:
            what, flag, seconds = "request line and headers", "header", self.limits.header_timeout_s
        else:
            what, flag, seconds = "request body", "body", self.limits.body_timeout_s
        self._refuse(
            408,
            f"the {what} did not arrive within {seconds:g} s; send requests at once, or "
            f"raise --{flag}-timeout-s",
        )

    def _header_message(self, size: int) -> str:
        return (
            f"the request line and headers have {size} bytes (or more), over the limit of "
            f"{self.limits.max_header_bytes}; send fewer or shorter headers, or raise "
            "--max-header-bytes"
        )

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error and close; a request in flight is abandoned."""
        self._disarm()
        log.debug("refused a connection from %s: %s", self.client, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() sees http.disconnect
            cycle.message_event.set()
        body = orjson.dumps({"error": message})
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        self.transport.write(head + b"connection: close\r\n\r\n" + body)
        self.transport.close()


class CoalescingTransport:
    """A transport that sends a response's head together with the body that follows it.

    uvicorn writes the status line and headers, then the body: two sends, two TCP segments
    and two reads for the client, per response. The head is held until the next write (in
    the same event-loop turn for a whole response, which the app sends back to back) and
    both leave in one writev; a head with nothing after it goes out on the next turn.
    """

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        elif data[:9] == b"HTTP/1.1 " and data[-4:] == b"\r\n\r\n":
            self._head = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
