"""HTTP/2 framing shared by the native gRPC server (transport/grpc_h2.py) and bench's gRPC
client (bench/grpc_client.py): frame types, flags and settings (RFC 9113), building a frame,
splitting received bytes into frames, and header fields that need no HPACK dynamic table.
Standard library only, so the load generator imports none of the server.
"""

from __future__ import annotations

import struct
from collections.abc import Generator

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# Settings (section 6.5.2).
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
U32 = struct.Struct(">I")

Frame = tuple[int, int, int, memoryview]  # type, flags, stream id, payload


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes | bytearray | memoryview = b""
) -> bytes:
    return U32.pack(len(payload))[1:] + bytes((kind, flags)) + U32.pack(stream_id) + payload


class FrameTooLarge(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(f"a frame of {length} bytes")


class FrameReader:
    """Received bytes in, whole frames out. Payloads are views of the bytes received (no
    copy); a frame split across reads is collected until it is whole, then copied once. A
    reader that stops iterating (closes the generator) keeps the frames it did not take for
    the next `feed`."""

    def __init__(self, max_frame: int = 2**24 - 1) -> None:
        self.max_frame = max_frame
        self._tail = bytearray()
        self._need = 0  # bytes the tail must hold before it is worth parsing

    def feed(self, data: bytes) -> Generator[Frame, None, None]:
        if self._tail:
            self._tail += data
            if len(self._tail) < self._need:
                return
            data, self._tail = bytes(self._tail), bytearray()
        view, pos, end = memoryview(data), 0, len(data)
        need = 9
        while end - pos >= 9:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            if length > self.max_frame:
                raise FrameTooLarge(length)
            if end - pos < 9 + length:
                need = 9 + length
                break
            sid = U32.unpack_from(data, pos + 5)[0] & 0x7FFFFFFF
            try:
                yield data[pos + 3], data[pos + 4], sid, view[pos + 9 : pos + 9 + length]
            except GeneratorExit:
                self._tail, self._need = bytearray(view[pos + 9 + length :]), 9
                raise
            pos += 9 + length
        if pos < end:
            self._tail, self._need = bytearray(view[pos:]), need


def unpad(flags: int, payload: memoryview) -> memoryview | None:
    """The payload without its padding (PADDED flag); None when the padding does not fit."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        return None
    return payload[1 : len(payload) - payload[0]]


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer (RFC 7541 5.1) with `first`'s high bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding (RFC 7541
    6.2.2): it needs no state shared with the peer's decoder, so blocks can be precomputed."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value
