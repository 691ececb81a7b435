"""Raw tensor bytes, as both v2 transports carry them (the binary HTTP extension and gRPC's
raw_input_contents / raw_output_contents): flat, row-major, little-endian, unpadded; a BYTES
element is a 4-byte little-endian length followed by that many bytes."""

from __future__ import annotations

import math
import struct

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.types import DATATYPE_TO_NUMPY

_U32 = struct.Struct("<I")
_DTYPES = {n: dt.newbyteorder("<") for n, dt in DATATYPE_TO_NUMPY.items() if n != "BYTES"}


def tensor_from_raw(
    buffer: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str, where: str
) -> np.ndarray:
    """One input's raw bytes as an array of `shape`: a read-only view (BYTES: object array).

    `where` names the buffer in error messages (e.g. "its raw_input_contents buffer").
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return unpack_bytes(buffer, count, name, where).reshape(shape)
    dtype = _DTYPES[datatype]
    need = count * dtype.itemsize
    if len(buffer) != need:
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {need} bytes but "
            f"{where} has {len(buffer)}"
        )
    array = np.frombuffer(buffer, dtype=dtype)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidArgument(f"input {name!r} is BOOL: each raw byte must be 0 or 1")
    return array.reshape(shape)


def unpack_bytes(buffer: bytes | memoryview, count: int, name: str, where: str) -> np.ndarray:
    """`count` length-prefixed elements filling `buffer` exactly -> object array of bytes."""
    size = len(buffer)
    if count * _U32.size > size:  # checked first: a huge declared shape allocates nothing
        raise InvalidArgument(
            f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes but "
            f"{where} has {size}"
        )
    view = memoryview(buffer)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > size:
            raise InvalidArgument(f"input {name!r}: BYTES element {i} of {count} is cut off")
        (length,) = _U32.unpack_from(view, pos)
        end = pos + 4 + length
        if end > size:
            raise InvalidArgument(
                f"input {name!r}: BYTES element {i} of {count} runs past the end of {where}; "
                "each element is a 4-byte little-endian length followed by that many bytes"
            )
        out[i] = bytes(view[pos + 4 : end])
        pos = end
    if pos != size:
        raise InvalidArgument(
            f"input {name!r}: {size - pos} bytes are left over after {count} BYTES elements "
            f"in {where}"
        )
    return out


def pack_bytes(array: np.ndarray) -> bytes:
    """Elements (bytes or text) as 4-byte little-endian lengths, each followed by its bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
