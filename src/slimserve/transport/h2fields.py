"""The rules a request's header fields must keep (RFC 9113 section 8.2 and 8.3), checked once
per header block by the HTTP/2 connection layer (transport/h2conn.py).

A request that breaks one is *malformed*: the stream is reset with PROTOCOL_ERROR and the
connection goes on (section 8.1.1). Checked here:
- field names are lowercase tokens (no uppercase, no separators, not empty);
- field values hold no NUL, CR or LF and neither start nor end with a space or a tab;
- pseudo-header fields: only :method, :scheme, :path and :authority, each at most once, all
  before the regular fields; :method, :scheme and a non-empty :path are present;
- no connection-specific fields (connection, keep-alive, proxy-connection, transfer-encoding,
  upgrade); `te` only as "trailers";
- content-length, when present, is digits (the body's length is checked at its end);
- trailers carry no pseudo-header field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# A token (RFC 9110 5.6.2) in lowercase: uppercase names are malformed in HTTP/2.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# Names already seen to be valid: hpack hands back the same few names on every call, so the
# regex runs once per name, not once per field. Bounded: a peer inventing names cannot grow it.
_KNOWN_NAMES: set[bytes] = set()
_KNOWN_NAMES_MAX = 4096


@dataclass(slots=True)
class RequestHead:
    """A request's header block, checked: its pseudo-header values and its regular fields."""

    method: bytes = b""
    scheme: bytes = b""
    path: bytes = b""
    authority: bytes = b""
    content_length: int | None = None
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)


class Malformed(Exception):
    """The header block breaks RFC 9113 8.2/8.3; the message says which rule."""


def _check_field(name: bytes, value: bytes) -> None:
    if name not in _KNOWN_NAMES:
        if _NAME.fullmatch(name) is None:
            raise Malformed(f"invalid field name {name[:64]!r}")
        if len(_KNOWN_NAMES) < _KNOWN_NAMES_MAX:
            _KNOWN_NAMES.add(name)
    if value and _BAD_VALUE.search(value) is not None:
        raise Malformed(f"invalid value for field {name[:64]!r}")


def request_head(headers: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """The checked request head of a decoded header block; raises Malformed."""
    head = RequestHead()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            _pseudo(head, name, value, regular)
            continue
        regular = True
        _check_field(name, value)
        if name in _CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name.decode('latin-1')!r}")
        if name == b"te" and value != b"trailers":
            raise Malformed('te may only be "trailers"')
        if name == b"content-length":
            if not value.isdigit() or head.content_length is not None:
                raise Malformed("content-length must be one decimal number")
            head.content_length = int(value)
        head.fields.append((name, value))
    if not head.method or not head.scheme or not head.path:
        raise Malformed("a request needs :method, :scheme and :path")
    return head


def _pseudo(head: RequestHead, name: bytes, value: bytes, regular: bool) -> None:
    if regular:
        raise Malformed(f"pseudo-header {name[:64]!r} after regular fields")
    if not value or _BAD_VALUE.search(value) is not None:
        raise Malformed(f"invalid value for {name[:64]!r}")
    # An if-chain, not getattr/setattr: this runs four times per call.
    if name == b":path" and not head.path:
        head.path = value
    elif name == b":method" and not head.method:
        head.method = value
    elif name == b":scheme" and not head.scheme:
        head.scheme = value
    elif name == b":authority" and not head.authority:
        head.authority = value
    elif name in _REQUEST_PSEUDO:
        raise Malformed(f"pseudo-header {name.decode()} twice")
    else:
        raise Malformed(f"unknown pseudo-header {name[:64]!r}")


def trailer_fields(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailers, checked: regular fields only (RFC 9113 8.1); raises Malformed."""
    out = []
    for name, value in headers:
        if name[:1] == b":":
            raise Malformed("a pseudo-header field in trailers")
        _check_field(name, value)
        out.append((name, value))
    return out
