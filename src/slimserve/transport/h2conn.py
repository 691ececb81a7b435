"""HTTP/2 server connections (RFC 9113) for request/answer protocols: the connection layer of
the native gRPC server (transport/grpc_h2.py is the call layer on top of it).

This layer owns frames, settings, streams and flow control; it knows nothing of gRPC. A call
layer subclasses `H2ServerConnection`, makes its streams (`new_stream`), and is told of a
request's head (`on_request`), each piece of its body (`on_data`), its end (`on_end`) and its
cancellation (`on_cancel`); it answers with `send_answer`, `send_trailers_only` or `reset`.

What it keeps (tests/transport/test_h2_conformance.py has the checklist and a test for each):
- the client's connection preface, then SETTINGS both ways (ours first, every one of the
  client's acknowledged); PING answered; GOAWAY sent on shutdown or on a connection error,
  honoured when received; PRIORITY (5 bytes) and unknown frame types ignored; padding removed;
- streams: opened by the client on odd ids that only grow, at most `max_streams` at once
  (more: REFUSED_STREAM); a frame on an idle stream is a connection error, DATA or HEADERS on
  a half-closed one a stream error (STREAM_CLOSED), frames on closed ones are ignored;
- header blocks: HEADERS and its CONTINUATION frames joined with nothing in between, decoded
  with `hpack` (the connection's one HPACK state), checked by `h2fields` (a malformed request:
  RST_STREAM PROTOCOL_ERROR); trailers end the request;
- flow control both ways. Receiving: the windows we advertise (`stream_window` per stream,
  `conn_window` for the connection) are enforced: DATA beyond a stream's window resets it
  with FLOW_CONTROL_ERROR, beyond the connection's fails the connection (GOAWAY
  FLOW_CONTROL_ERROR); credit is given back in WINDOW_UPDATEs once half a window is consumed,
  and never for a stream whose request was refused (it is reset). Sending: answers respect
  the client's windows and largest frame size and wait for WINDOW_UPDATE;
- abuse: client resets (RST_STREAM, the "rapid reset" attack, CVE-2023-44487) and the streams
  we reset for the client's faults draw on a token bucket (`reset_burst`, refilled at
  `reset_rate` a second; nghttp2's defaults); when it is empty the connection is closed with
  GOAWAY ENHANCE_YOUR_CALM. A header block over 16x `max_header_bytes` fails the connection
  (ENHANCE_YOUR_CALM); the preface must arrive within `handshake_s`, a request's body within
  `body_s` of its headers (else RST_STREAM CANCEL); a connection without a
  call for `idle_s` is closed; a peer silent for `ping_every_s` is pinged and dropped if it
  does not answer. While the peer does not read what we write (the transport's buffer is
  over its high-water mark), we stop reading from it, so PING, SETTINGS or request floods
  cannot grow our output buffer.
"""

from __future__ import annotations

import struct
from typing import Any

import hpack
import hpack.exceptions

from slimserve.transport import h2wire as wire
from slimserve.transport.h2base import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    H2Connection,
    H2Limits,
    H2Stream,
    log,
)
from slimserve.transport.h2fields import Malformed, request_head, trailer_fields

__all__ = ["H2Limits", "H2ServerConnection", "H2Stream"]


class H2ServerConnection(H2Connection):
    """The server side of one HTTP/2 connection. Call layers implement the hooks
    (`new_stream`, `on_request`, `on_data`, `on_end`, `on_cancel`, `on_connection`)."""

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.last_seen = self.clock()
        if not self.preface:
            data = self._read_preface(data)
            if not data:
                return
        frames = self.reader.feed(data)
        try:
            for kind, flags, stream_id, payload in frames:
                self._dispatch(kind, flags, stream_id, payload)
                if self.failed:
                    return
                if self.paused:  # the peer is not reading: the rest waits (resume_writing)
                    frames.close()
                    break
        except wire.FrameTooLarge as exc:
            self.fail(FRAME_SIZE_ERROR, str(exc))
            return
        if self.recv_unacked >= self.limits.conn_window // 2 and self.transport is not None:
            self.transport.write(
                wire.frame(wire.WINDOW_UPDATE, 0, 0, wire.U32.pack(self.recv_unacked))
            )
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def _read_preface(self, data: bytes) -> bytes:
        """The bytes after the client's connection preface (b"" while it is incomplete)."""
        seen = self.preface_bytes + data
        if not (wire.PREFACE.startswith(seen) or seen.startswith(wire.PREFACE)):
            self.fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            return b""
        if len(seen) < len(wire.PREFACE):
            self.preface_bytes = seen
            return b""
        self.preface = True
        return seen[len(wire.PREFACE) :]

    def _dispatch(self, kind: int, flags: int, sid: int, payload: memoryview) -> None:
        if self.header_block is not None and kind != wire.CONTINUATION:
            self.fail(PROTOCOL_ERROR, "a header block was interrupted")
        elif kind == wire.DATA:
            self._on_data(flags, sid, payload)
        elif kind == wire.HEADERS:
            self._on_headers(flags, sid, payload)
        elif kind == wire.CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif kind == wire.SETTINGS:
            self._on_settings(flags, sid, payload)
        elif kind == wire.WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif kind == wire.PING:
            self._on_ping(flags, sid, payload)
        elif kind == wire.RST_STREAM:
            self._on_reset(sid, payload)
        elif kind == wire.PRIORITY:
            if sid == 0:
                self.fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            elif len(payload) != 5:
                if self._idle(sid):  # no RST_STREAM may name an idle stream
                    self.fail(FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")
                else:
                    self._stream_error(sid, FRAME_SIZE_ERROR)
        elif kind == wire.GOAWAY:
            self._on_goaway(sid, payload)
        elif kind == wire.PUSH_PROMISE:
            self.fail(PROTOCOL_ERROR, "a client may not push")
        # Unknown frame types are ignored (RFC 9113 5.5).

    def _idle(self, sid: int) -> bool:
        """A stream the client has not opened yet (RFC 9113 5.1)."""
        return sid > self.last_stream

    def _on_ping(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            self.fail(PROTOCOL_ERROR, "PING on a stream")
        elif len(payload) != 8:
            self.fail(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
        elif flags & wire.ACK:
            self.ping_sent = None
        elif self.transport is not None:
            self.transport.write(wire.frame(wire.PING, wire.ACK, 0, payload))

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0:
            self.fail(PROTOCOL_ERROR, "GOAWAY on a stream")
        elif len(payload) < 8:
            self.fail(FRAME_SIZE_ERROR, "GOAWAY under 8 bytes")
        else:
            self.going_away = True
            if not self.streams and self.transport is not None:
                self.transport.close()

    def _on_reset(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            self.fail(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
            return
        if sid == 0 or self._idle(sid):
            self.fail(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        if not self._spend_reset():
            return
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.closed = True
            self.on_cancel(stream)
            self._after_close()

    def _unpad(self, flags: int, payload: memoryview) -> memoryview | None:
        out = wire.unpad(flags, payload)
        if out is None:
            self.fail(PROTOCOL_ERROR, "padding longer than the frame")
        return out

    def _on_data(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0 or self._idle(sid):
            self.fail(PROTOCOL_ERROR, "DATA on an idle stream")
            return
        size = len(payload)  # padding included: all of it is flow-controlled
        if size > self.recv_window:
            self.fail(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
            return
        self.recv_window -= size
        self.recv_unacked += size  # consumed here, buffered or dropped
        data = self._unpad(flags, payload)
        if data is None:
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # a closed stream: frames in flight when it closed are ignored
        if stream.ended:
            self._stream_error(sid, STREAM_CLOSED)
            return
        if size > stream.recv_window:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            return
        stream.recv_window -= size
        stream.received += len(data)
        end = bool(flags & wire.END_STREAM)
        self.on_data(stream, data, end)
        if stream.closed:
            return  # answered (refused) already
        if end:
            self._end_of_request(stream)
        else:
            self._give_back(stream, size)

    def _give_back(self, stream: H2Stream, size: int) -> None:
        """Stream credit for consumed bytes, in one WINDOW_UPDATE per half window."""
        stream.recv_unacked += size
        if stream.recv_unacked >= self.limits.stream_window // 2 and self.transport is not None:
            self.transport.write(
                wire.frame(wire.WINDOW_UPDATE, 0, stream.id, wire.U32.pack(stream.recv_unacked))
            )
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def _end_of_request(self, stream: H2Stream) -> None:
        if stream.ended:
            return
        stream.ended = True
        if stream.content_length is not None and stream.content_length != stream.received:
            self._stream_error(stream.id, PROTOCOL_ERROR)  # malformed (RFC 9113 8.1.1)
            return
        self.on_end(stream)

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0 or sid % 2 == 0:
            self.fail(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
            return
        block = self._unpad(flags, payload)
        if block is None:
            return
        if flags & wire.PRIORITY_FLAG:
            if len(block) < 5:
                self.fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                return
            block = block[5:]
        if len(block) > self.limits.block_limit:
            self.fail(ENHANCE_YOUR_CALM, "header block over the metadata limit")
            return
        if flags & wire.END_HEADERS:
            self._headers_complete(sid, flags, bytes(block))
        else:
            self.header_block, self.header_stream, self.header_flags = bytearray(block), sid, flags

    def _on_continuation(self, flags: int, sid: int, payload: memoryview) -> None:
        if self.header_block is None or sid != self.header_stream:
            self.fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            return
        self.header_block += payload
        if len(self.header_block) > self.limits.block_limit:
            self.fail(ENHANCE_YOUR_CALM, "header block over the metadata limit")
            return
        if flags & wire.END_HEADERS:
            block, self.header_block = bytes(self.header_block), None
            self._headers_complete(self.header_stream, self.header_flags, block)

    def _headers_complete(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.exceptions.OversizedHeaderListError:
            self.fail(ENHANCE_YOUR_CALM, "metadata over the limit (max_header_bytes)")
            return
        except hpack.exceptions.HPACKError as exc:
            self.fail(COMPRESSION_ERROR, f"bad header block: {exc}")
            return
        stream = self.streams.get(sid)
        if stream is not None:
            self._on_trailers(stream, flags, headers)
        elif sid <= self.last_stream:
            if sid not in self.sent_resets:  # else sent before our reset reached the client
                self.fail(STREAM_CLOSED, "HEADERS on a closed stream")
        else:
            self._open(sid, flags, headers)

    def _on_trailers(self, stream: H2Stream, flags: int, headers: Any) -> None:
        if stream.ended:
            self._stream_error(stream.id, STREAM_CLOSED)
            return
        try:
            trailer_fields(headers)
        except Malformed:
            self._stream_error(stream.id, PROTOCOL_ERROR)
            return
        if not flags & wire.END_STREAM:
            self._stream_error(stream.id, PROTOCOL_ERROR)  # a second header block must end it
            return
        self._end_of_request(stream)

    def _open(self, sid: int, flags: int, headers: Any) -> None:
        self.last_stream = sid
        self.last_call = self.clock()
        if self.going_away or len(self.streams) >= self.limits.max_streams:
            if self._spend_reset():
                self.reset(sid, REFUSED_STREAM)
            return
        try:
            head = request_head(headers)
        except Malformed as exc:
            log.debug("malformed request from %s: %s", self.peer_name, exc)
            if self._spend_reset():
                self.reset(sid, PROTOCOL_ERROR)
            return
        stream = self.new_stream(sid, self.peer_window, self.local_window)
        stream.opened = self.last_call
        stream.content_length = head.content_length
        self.streams[sid] = stream
        self.on_request(stream, head, bool(flags & wire.END_STREAM))
        if flags & wire.END_STREAM and not stream.closed:
            self._end_of_request(stream)

    # -- settings and windows ----------------------------------------------------------------

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            self.fail(PROTOCOL_ERROR, "SETTINGS on a stream")
            return
        if flags & wire.ACK:
            if payload:
                self.fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            else:
                self._our_settings_acked()
            return
        if len(payload) % 6:
            self.fail(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
            return
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if not self._apply_setting(key, value):
                return
        if self.transport is not None:
            self.transport.write(wire.frame(wire.SETTINGS, wire.ACK, 0))
        self._flush_all()

    def _apply_setting(self, key: int, value: int) -> bool:
        if key == wire.S_INITIAL_WINDOW_SIZE:
            if value > wire.MAX_WINDOW:
                self.fail(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                return False
            delta, self.peer_window = value - self.peer_window, value
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > wire.MAX_WINDOW:
                    self.fail(FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
                    return False
        elif key == wire.S_MAX_FRAME_SIZE:
            if not wire.DEFAULT_FRAME <= value <= 2**24 - 1:
                self.fail(PROTOCOL_ERROR, "max frame size out of range")
                return False
            self.peer_frame = value
        elif key == wire.S_HEADER_TABLE_SIZE:
            self.table_update = b"\x20"  # a size update to 0 (RFC 7541 6.3)
        elif key == wire.S_ENABLE_PUSH and value > 1:
            self.fail(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            return False
        return True  # other settings (and unknown ones, RFC 9113 6.5.2) change nothing here

    def _our_settings_acked(self) -> None:
        """From now on the client counts with our stream window (it may have been smaller)."""
        if self.settings_acked:
            return
        self.settings_acked = True
        delta = self.limits.stream_window - self.local_window
        self.local_window = self.limits.stream_window
        if delta:
            for stream in self.streams.values():
                stream.recv_window += delta

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            self.fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
            return
        increment = wire.U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                self.fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                return
            self.send_window += increment
            if self.send_window > wire.MAX_WINDOW:
                self.fail(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
                return
            self._flush_all()
            return
        if self._idle(sid):
            self.fail(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # closed: a late update is harmless
        if increment == 0:
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > wire.MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
        elif stream.pending:
            self._flush(stream)
