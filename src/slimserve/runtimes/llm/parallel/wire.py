"""The driver <-> worker messages: a JSON header and raw tensor bytes (no pickle).

    [4-byte little-endian header length][header JSON][tensor bytes, in header order]

The header holds the message's fields and, under "tensors", [name, dtype, shape] of each
tensor that follows. Sent over a multiprocessing pipe with send_bytes/recv_bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

_DTYPES = {"int64": torch.int64, "float32": torch.float32}


def encode(fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    tensors = tensors or {}
    specs = [
        [name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()
    ]
    header = json.dumps(fields | {"tensors": specs}).encode()
    body = [t.contiguous().numpy().tobytes() for t in tensors.values()]
    return b"".join([struct.pack("<I", len(header)), header, *body])


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    (size,) = struct.unpack_from("<I", message)
    fields = json.loads(message[4 : 4 + size])
    view, offset = memoryview(message), 4 + size
    tensors = {}
    for name, dtype, shape in fields.pop("tensors"):
        kind = _DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=kind).element_size()
        flat = torch.frombuffer(bytearray(view[offset : offset + nbytes]), dtype=kind)
        tensors[name] = flat.view(shape)
        offset += nbytes
    return fields, tensors


def header(message: bytes) -> dict[str, Any]:
    """A message's fields alone (its tensors not copied)."""
    (size,) = struct.unpack_from("<I", message)
    fields: dict[str, Any] = json.loads(message[4 : 4 + size])
    return fields
