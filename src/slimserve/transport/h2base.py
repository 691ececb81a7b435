"""The state of one HTTP/2 server connection, its life (handshake deadline, keep-alive,
idle close, GOAWAY) and what it sends (answers within the client's windows, resets), for
transport/h2conn.py, which reads frames and keeps the protocol's rules.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hpack

from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.policies.rate_limit import Bucket, Limit, take
from slimserve.transport import h2wire as wire
from slimserve.transport.h2fields import RequestHead

log = logging.getLogger("slimserve.grpc")

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one connection allows (SECURITY.md lists them with their reasons)."""

    max_frame: int = 1 << 20  # frames we accept: fewer frames per large tensor
    stream_window: int = 1 << 24  # per stream: most requests never wait for a WINDOW_UPDATE
    conn_window: int = wire.MAX_WINDOW  # the whole connection
    max_streams: int = 1024  # requests in flight per connection
    max_header_bytes: int = 32 * 1024  # metadata; a block over 16x fails the connection
    reset_burst: int = 1000  # resets allowed at once (nghttp2's default) ...
    reset_rate: float = 33.0  # ... and refilled per second (nghttp2's default)
    handshake_s: float = 10.0  # to send the connection preface
    body_s: float = 60.0  # to send a request's body, from its headers
    idle_s: float = 300.0  # without a call, then GOAWAY
    ping_every_s: float = 60.0  # silence before we ping
    ping_timeout_s: float = 20.0  # for the PING's answer

    def __post_init__(self) -> None:
        if not wire.DEFAULT_FRAME <= self.max_frame <= 2**24 - 1:
            raise ConfigError(f"max_frame {self.max_frame} must be within 2^14..2^24-1")
        if not 1 <= self.stream_window <= wire.MAX_WINDOW:
            raise ConfigError(f"stream_window {self.stream_window} must be within 1..2^31-1")
        if not wire.DEFAULT_WINDOW <= self.conn_window <= wire.MAX_WINDOW:
            # A connection window can only grow from 65,535 (WINDOW_UPDATE, never SETTINGS).
            raise ConfigError(f"conn_window {self.conn_window} must be within 65535..2^31-1")
        if self.max_streams < 1 or self.reset_burst < 1 or self.reset_rate <= 0:
            raise ConfigError("max_streams and reset_burst must be >= 1, reset_rate > 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> H2Limits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            handshake_s=settings.header_timeout_s,
            body_s=settings.body_timeout_s,
            idle_s=settings.keep_alive_s * 10,
        )

    @property
    def block_limit(self) -> int:
        """Largest header block, compressed or decoded (an HPACK bomb): must be decoded to
        keep the connection's HPACK state, so over it the connection fails."""
        return 16 * self.max_header_bytes


class H2Stream:
    """One request/answer exchange. Call layers subclass it with their own fields."""

    __slots__ = (
        "closed",
        "content_length",
        "ended",
        "id",
        "opened",
        "pending",
        "received",
        "recv_unacked",
        "recv_window",
        "send_window",
        "trailers",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window  # what the client lets us send
        self.recv_window = recv_window  # what the client may still send us
        self.recv_unacked = 0  # consumed, not yet given back in a WINDOW_UPDATE
        self.received = 0  # body bytes, for content-length
        self.content_length: int | None = None
        self.opened = 0.0  # when its headers came (the connection's clock)
        self.pending = b""  # answer bytes waiting for window
        self.trailers = b""  # the trailers' header block, sent after `pending`
        self.ended = False  # the client's half is closed
        self.closed = False  # both halves: forgotten by the connection


class H2Connection(asyncio.Protocol):
    """One HTTP/2 server connection's state, life and sending side; h2conn.py reads."""

    def __init__(self, limits: H2Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.reader = wire.FrameReader(limits.max_frame)
        self.preface = False
        self.preface_bytes = b""
        self.decoder = hpack.Decoder(max_header_list_size=limits.block_limit)
        self.streams: dict[int, H2Stream] = {}
        self.last_stream = 0
        self.peer_window = wire.DEFAULT_WINDOW  # initial send window of each new stream
        self.peer_frame = wire.DEFAULT_FRAME
        # After the client changes SETTINGS_HEADER_TABLE_SIZE, our next header block must
        # start with a dynamic table size update (RFC 7541 4.2); ours is always 0: our
        # blocks never index anything.
        self.table_update = b""
        self.send_window = wire.DEFAULT_WINDOW  # the connection's, toward the client
        # Until the client acknowledges our SETTINGS it may assume the default stream window.
        self.local_window = max(limits.stream_window, wire.DEFAULT_WINDOW)
        self.settings_acked = False
        self.recv_window = limits.conn_window  # the connection's, from the client
        self.recv_unacked = 0
        self.header_block: bytearray | None = None  # a HEADERS frame waiting for CONTINUATION
        self.header_stream = 0
        self.header_flags = 0
        self.going_away = False
        self.failed = False
        self.paused = False  # the peer does not read: we do not either
        # Streams we reset: the peer's frames already in flight on them are ignored (RFC 9113
        # 5.1), HEADERS included. Bounded: only the most recent resets matter.
        self.sent_resets: set[int] = set()
        self.peer_name = "unknown"
        self.started = self.last_call = self.last_seen = clock()
        self.ping_sent: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reset_limit = Limit(rate=limits.reset_rate, burst=limits.reset_burst)
        self.reset_bucket = Bucket(tokens=float(limits.reset_burst), updated=self.started)

    # -- hooks for the call layer ------------------------------------------------------------

    def new_stream(self, stream_id: int, send_window: int, recv_window: int) -> H2Stream:
        return H2Stream(stream_id, send_window, recv_window)

    def on_request(self, stream: H2Stream, head: RequestHead, end: bool) -> None:
        """A request's checked head; `end`: it has no body (on_end follows)."""

    def on_data(self, stream: H2Stream, data: memoryview, end: bool) -> None:
        """A piece of a request's body (a view of the bytes received: keep a copy)."""

    def on_end(self, stream: H2Stream) -> None:
        """The client's half is closed (END_STREAM): the request is whole."""

    def on_cancel(self, stream: H2Stream) -> None:
        """The stream was reset, by either side, or the connection was lost."""

    def on_connection(self, made: bool) -> None:
        """The connection was made (True) or lost (False)."""

    # -- connection life ---------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport: Any = base  # uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            kind = "ipv6" if ":" in peer[0] else "ipv4"
            host = f"[{peer[0]}]" if kind == "ipv6" else peer[0]
            self.peer_name = f"{kind}:{host}:{peer[1]}"
        lim = self.limits
        settings = struct.pack(
            ">HIHIHIHI",
            wire.S_MAX_CONCURRENT_STREAMS, lim.max_streams,
            wire.S_INITIAL_WINDOW_SIZE, lim.stream_window,
            wire.S_MAX_FRAME_SIZE, lim.max_frame,
            wire.S_MAX_HEADER_LIST_SIZE, lim.max_header_bytes,
        )  # fmt: skip
        out = wire.frame(wire.SETTINGS, 0, 0, settings)
        if lim.conn_window > wire.DEFAULT_WINDOW:
            out += wire.frame(
                wire.WINDOW_UPDATE, 0, 0, wire.U32.pack(lim.conn_window - wire.DEFAULT_WINDOW)
            )
        transport.write(out)
        self.on_connection(True)
        self._schedule_tick()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream.closed = True
            self.on_cancel(stream)
        self.transport = None
        self.on_connection(False)

    def pause_writing(self) -> None:
        # The peer does not read what we send: stop reading what it sends (its PINGs,
        # SETTINGS and requests would each add to our output buffer), from the next frame.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.failed:
            self.transport.resume_reading()
            # The frames left unread when we paused (kept by the FrameReader).
            asyncio.get_running_loop().call_soon(self.data_received, b"")

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(min(1.0, self.limits.handshake_s / 2), self._tick)

    def _tick(self) -> None:
        """Handshake deadline, idle connections, and keep-alive pings."""
        if self.transport is None:
            return
        now, lim = self.clock(), self.limits
        if not self.preface and now - self.started > lim.handshake_s:
            self.transport.abort()
            return
        self._drop_slow_requests(now)
        if not self.streams and now - self.last_call > lim.idle_s:
            self.goaway(NO_ERROR, b"idle")
            self.transport.close()
            return
        if self.ping_sent is not None and now - self.ping_sent > lim.ping_timeout_s:
            self.transport.abort()  # no PING ACK: the peer is gone
            return
        if self.ping_sent is None and now - self.last_seen > lim.ping_every_s:
            self.ping_sent = now
            self.transport.write(wire.frame(wire.PING, 0, 0, b"slimserv"))
        self._schedule_tick()

    def _drop_slow_requests(self, now: float) -> None:
        """Requests whose body is not whole `body_s` after their headers are reset (CANCEL):
        a slow sender cannot hold a stream, and its buffer, for ever."""
        late = [
            s for s in self.streams.values() if not s.ended and now - s.opened > self.limits.body_s
        ]
        for stream in late:
            log.debug("gRPC request from %s too slow: stream %d reset", self.peer_name, stream.id)
            self.reset(stream.id, CANCEL)
            self.streams.pop(stream.id, None)
            stream.closed = stream.ended = True
            self.on_cancel(stream)
        if late:
            self._after_close()

    def goaway(self, code: int, debug: bytes = b"") -> None:
        if self.transport is not None and not self.going_away:
            self.going_away = True
            payload = struct.pack(">II", self.last_stream, code) + debug
            self.transport.write(wire.frame(wire.GOAWAY, 0, 0, payload))

    def fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with the code and close; nothing more is read."""
        log.debug("HTTP/2 connection from %s closed: %s", self.peer_name, why)
        self.goaway(code, why.encode()[:200])
        self.failed = True
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server stop: no new requests; those in progress may finish."""
        self.goaway(NO_ERROR, b"server stopping")
        if not self.streams and self.transport is not None:
            self.transport.close()

    def _spend_reset(self) -> bool:
        """One reset from the budget; False (and the connection failed) when it is spent."""
        if take(self.reset_limit, self.reset_bucket, self.clock()) == 0.0:
            return True
        self.fail(ENHANCE_YOUR_CALM, "too many stream resets (rapid reset)")
        return False

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM with `code`; the stream is forgotten and its request cancelled."""
        if not self._spend_reset():
            return
        self.reset(sid, code)
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.closed = True
            self.on_cancel(stream)
            self._after_close()

    # -- writing -----------------------------------------------------------------------------

    def send_answer(self, stream: H2Stream, head: bytes, body: bytes, trailers: bytes) -> None:
        """HEADERS `head`, DATA `body` as the windows allow, then HEADERS `trailers` ending
        the stream; one write when the windows hold the whole body (the common case)."""
        if stream.closed or self.transport is None:
            return
        sid = stream.id
        if self.table_update:
            head, self.table_update = self.table_update + head, b""
        if len(body) <= min(stream.send_window, self.send_window, self.peer_frame):
            stream.send_window -= len(body)
            self.send_window -= len(body)
            self.transport.write(
                wire.frame(wire.HEADERS, wire.END_HEADERS, sid, head)
                + wire.frame(wire.DATA, 0, sid, body)
                + wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, sid, trailers)
            )
            self.close_stream(stream)
            return
        self.transport.write(wire.frame(wire.HEADERS, wire.END_HEADERS, sid, head))
        stream.pending, stream.trailers = body, trailers
        self._flush(stream)

    def send_trailers_only(self, stream: H2Stream, block: bytes) -> None:
        """One HEADERS frame ending the stream."""
        if stream.closed or self.transport is None:
            return
        if self.table_update:
            block, self.table_update = self.table_update + block, b""
        self.transport.write(
            wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream.id, block)
        )
        self.close_stream(stream)

    def stop_receiving(self, stream: H2Stream) -> None:
        """The answer went out before the request ended: tell the client to stop sending
        (RST_STREAM NO_ERROR, RFC 9113 8.1). The stream is closed: no more credit for it."""
        if not stream.ended:
            stream.ended = True
            self.reset(stream.id, NO_ERROR)

    def reset(self, sid: int, code: int) -> None:
        if len(self.sent_resets) >= 1024:
            self.sent_resets.clear()
        self.sent_resets.add(sid)
        if self.transport is not None:
            self.transport.write(wire.frame(wire.RST_STREAM, 0, sid, wire.U32.pack(code)))

    def _flush(self, stream: H2Stream) -> None:
        """Send what the windows allow of the stream's answer; the trailers when all is out."""
        transport = self.transport
        if transport is None:
            return
        frames = []
        while stream.pending:
            n = min(len(stream.pending), stream.send_window, self.send_window, self.peer_frame)
            if n <= 0:
                break
            frames.append(wire.frame(wire.DATA, 0, stream.id, stream.pending[:n]))
            stream.pending = stream.pending[n:]
            stream.send_window -= n
            self.send_window -= n
        if not stream.pending:
            block, self.table_update = self.table_update + stream.trailers, b""
            frames.append(
                wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream.id, block)
            )
        transport.write(b"".join(frames))
        if not stream.pending:
            self.close_stream(stream)

    def close_stream(self, stream: H2Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.last_call = self.clock()
        self._after_close()

    def _after_close(self) -> None:
        if self.going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def _flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending and self.send_window > 0:
                self._flush(stream)
