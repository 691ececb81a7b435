"""Reading Deep Compression files (.dcz), written by `slimserve.optimize.compress`.

## The .dcz format (version 1; all integers little-endian)

    bytes 0-7    magic b"SLIMDCZ1"
    bytes 8-15   u64 H: length of the header
    H bytes      JSON header, UTF-8
    the rest     data section: the binary blobs the header points into

Header: {"format": "slimserve.dcz", "version": 1, "meta": {...}, "tensors": [entry, ...]}.
Every blob is {"offset": bytes from the start of the data section, "length": bytes}.

- raw entry (biases, unshared weights, buffers): {"name", "kind": "raw", "dtype": "float32" ...,
  "shape", "data": blob}: the tensor's bytes, row-major.
- shared entry: {"name", "kind": "shared", "dtype": "float32", "shape", "bits", "gap_bits",
  "entries", "codebook": blob of 2^bits float32 (entry 0 is 0.0), "codes": stream,
  "gaps": stream}; stream = {"offset", "length", "nbits", "lengths": the Huffman code length
  of each symbol 0, 1, ... as one hex digit, trailing zeros dropped (e.g. "2202")}.
  The flattened (row-major) weight is stored as `entries` pairs (gap, code): gap =
  zeros skipped since the previous entry, in [0, 2^gap_bits - 1]; value = codebook[code].
  A run of zeros longer than the largest gap is bridged by filler entries (gap = max, code 0:
  a stored zero). Decoding: position = cumsum(gap + 1) - 1. Codes and gaps are each Huffman
  coded (canonical codes, MSB first; see `slimserve.runtimes.huffman`).

No pickle anywhere: loading reads JSON and raw numbers only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimserve.errors import InvalidArgument
from slimserve.runtimes import huffman

MAGIC = b"SLIMDCZ1"
VERSION = 1
_MAX_HEADER = 64 << 20  # bytes; a larger header is a corrupt or hostile file
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def load_compressed(path: str | Path, sparse: bool = False) -> dict[str, torch.Tensor]:
    """State dict[str, Any] of a .dcz file: dense tensors, or sparse COO for shared weights."""
    raw = Path(path).read_bytes()
    header, data = _split(raw, str(path))
    tensors = {}
    for entry in header["tensors"]:
        try:
            tensors[entry["name"]] = _decode_entry(entry, data, sparse)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            name = entry.get("name", "?") if isinstance(entry, dict) else "?"
            raise InvalidArgument(f"{path}: tensor {name!r} is corrupt ({exc})") from exc
    return tensors


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .dcz file (format, version, meta, tensor entries)."""
    return _split(Path(path).read_bytes(), str(path))[0]


def _split(raw: bytes, where: str) -> tuple[dict[str, Any], memoryview]:
    if raw[:8] != MAGIC or len(raw) < 16:
        raise InvalidArgument(
            f"{where}: not a .dcz file (bad magic); write it with save_compressed"
        )
    (size,) = struct.unpack("<Q", raw[8:16])
    if size > min(_MAX_HEADER, len(raw) - 16):
        raise InvalidArgument(f"{where}: header length {size} exceeds the file; it is truncated")
    try:
        header = json.loads(raw[16 : 16 + size])
    except ValueError as exc:
        raise InvalidArgument(f"{where}: header is not valid JSON ({exc})") from exc
    if header.get("format") != "slimserve.dcz" or header.get("version") != VERSION:
        raise InvalidArgument(
            f"{where}: format {header.get('format')!r} version {header.get('version')!r} is not "
            f"supported; this slimserve reads slimserve.dcz version {VERSION}"
        )
    return header, memoryview(raw)[16 + size :]


def _blob(data: memoryview, ref: dict[str, Any]) -> bytes:
    start, length = int(ref["offset"]), int(ref["length"])
    if start < 0 or length < 0 or start + length > len(data):
        raise ValueError(f"section [{start}, {start + length}) lies outside the data")
    return bytes(data[start : start + length])


def _decode_entry(entry: dict[str, Any], data: memoryview, sparse: bool) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    if entry["kind"] == "raw":
        dtype = DTYPES[entry["dtype"]]
        buf = bytearray(_blob(data, entry["data"]))
        flat = (
            torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
        )
        return flat.view(dtype).reshape(shape)
    if entry["kind"] != "shared":
        raise ValueError(f"unknown kind {entry['kind']!r}")
    return _decode_shared(entry, data, shape, sparse)


def _decode_shared(
    entry: dict[str, Any], data: memoryview, shape: list[int], sparse: bool
) -> torch.Tensor:
    count = int(entry["entries"])
    codes = _read_stream(data, entry["codes"], count, 1 << int(entry["bits"]))
    gaps = _read_stream(data, entry["gaps"], count, 1 << int(entry["gap_bits"]))
    book = np.frombuffer(_blob(data, entry["codebook"]), dtype="<f4")
    numel = int(np.prod(shape))
    positions = np.cumsum(gaps + 1) - 1
    if count and (positions[-1] >= numel or codes.max() >= len(book)):
        raise ValueError("entries point past the tensor or the codebook")
    values = torch.from_numpy(book[codes].copy())
    index = torch.from_numpy(positions)
    if sparse:
        keep = values != 0  # drop the filler zeros
        coords = torch.stack(torch.unravel_index(index[keep], shape))
        return torch.sparse_coo_tensor(
            coords, values[keep], shape, check_invariants=True
        ).coalesce()
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[index] = values
    return dense.view(shape)


def _read_stream(data: memoryview, ref: dict[str, Any], count: int, alphabet: int) -> np.ndarray:
    if alphabet > 256:
        raise ValueError(f"alphabet of {alphabet} symbols; at most 8 bits per symbol")
    lengths = huffman.lengths_from_text(str(ref["lengths"]), alphabet)
    return huffman.decode(_blob(data, ref), int(ref["nbits"]), count, lengths)
