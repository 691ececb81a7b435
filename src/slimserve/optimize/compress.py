"""Deep Compression storage (Han et al. 2016): weight sharing, relative sparse indices, Huffman.

1. `share_weights_(model, WeightSharing(bits=5))` (from `slimserve.optimize.sharing`, also
   importable here): k-means codes per layer; the module gets a uint8 buffer `weight_codes`.
2. `finetune_centroids(...)`: trains the shared values (gradients summed per cluster).
3. `save_compressed(model, path)`: writes a `.dcz` file (below); `load_compressed(path)` gives
   back a state dict of dense (or sparse) tensors equal bit for bit to the shared model's.

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
  coded (canonical codes, MSB first; see `slimserve.optimize.huffman`).

No pickle anywhere: loading reads JSON and raw numbers only.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize import huffman
from slimserve.optimize.prune import tensor_of
from slimserve.optimize.sharing import (  # re-exported: one import site for Deep Compression
    SharedGradients,
    WeightSharing,
    code_bits,
    codebook_of,
    finetune_centroids,
    kmeans_codes,
    share_weights_,
    unique_values,
)

__all__ = [
    "CompressionStats",
    "SharedGradients",
    "TensorSize",
    "WeightSharing",
    "codebook_of",
    "compressed_size",
    "encode_model",
    "finetune_centroids",
    "kmeans_codes",
    "load_compressed",
    "read_header",
    "relative_entries",
    "save_compressed",
    "share_weights_",
    "unique_values",
]

MAGIC = b"SLIMDCZ1"
VERSION = 1
_MAX_HEADER = 64 << 20  # bytes; a larger header is a corrupt or hostile file
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class TensorSize:
    """Stored bytes of one tensor and, for shared ones, their parts."""

    dense_bytes: int
    stored_bytes: int
    nonzero: int = 0
    entries: int = 0  # stored (gap, code) pairs, fillers included
    codebook_bytes: int = 0
    code_bits: int = 0
    gap_bits: int = 0


@dataclass
class CompressionStats:
    """Sizes in bytes: dense float tensors vs the .dcz file (header and codebooks included)."""

    dense_bytes: int
    stored_bytes: int
    tensors: dict[str, TensorSize] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.stored_bytes, 1)


def save_compressed(
    model: nn.Module, path: str | Path, meta: dict | None = None
) -> CompressionStats:
    """Write the model's state as a .dcz file (atomically: temp file, then rename)."""
    blob, stats = encode_model(model, meta)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


def compressed_size(model: nn.Module) -> CompressionStats:
    """What `save_compressed` would store, without writing a file."""
    return encode_model(model)[1]


def encode_model(model: nn.Module, meta: dict | None = None) -> tuple[bytes, CompressionStats]:
    """The .dcz bytes of `model` and their size breakdown."""
    entries: list[dict] = []
    chunks: list[bytes] = []
    stats = CompressionStats(0, 0)
    offset = 0
    for name, tensor, module in _stored_tensors(model):
        entry, parts, size = _encode_tensor(name, tensor, module, offset)
        entries.append(entry)
        chunks.extend(parts)
        offset += sum(len(p) for p in parts)
        stats.tensors[name] = size
        stats.dense_bytes += size.dense_bytes
    header = {"format": "slimserve.dcz", "version": VERSION, "meta": meta or {}}
    header["tensors"] = entries
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = MAGIC + struct.pack("<Q", len(head)) + head + b"".join(chunks)
    stats.stored_bytes = len(blob)
    return blob, stats


def _stored_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, nn.Module | None]]:
    """(state-dict name, tensor, owning module if its weight is shared), masks/codes left out."""
    out = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        shared = "weight_codes" in module._buffers
        for key, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or key.endswith(("_mask", "_codes")):
                continue
            if key in module._non_persistent_buffers_set:
                continue
            owner = module if shared and key == "weight" else None
            out.append((prefix + key, t.detach().cpu(), owner))
    return out


def _encode_tensor(
    name: str, tensor: torch.Tensor, module: nn.Module | None, offset: int
) -> tuple[dict, list[bytes], TensorSize]:
    dense = tensor.numel() * tensor.element_size()
    if module is None:
        data = _raw_bytes(tensor)
        entry: dict[str, object] = {"name": name, "kind": "raw"}
        entry |= {"dtype": _dtype_name(name, tensor), "shape": list(tensor.shape)}
        entry |= {"data": {"offset": offset, "length": len(data)}}
        return entry, [data], TensorSize(dense, len(data), int(tensor.count_nonzero()))
    return _encode_shared(name, module, offset, dense)


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in _NAMES:
        raise InvalidArgument(f"cannot store {name!r}: dtype {tensor.dtype} is not supported")
    return _NAMES[tensor.dtype]


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _encode_shared(
    name: str, module: nn.Module, offset: int, dense: int
) -> tuple[dict, list[bytes], TensorSize]:
    bits = code_bits(module)
    codes = tensor_of(module, "weight_codes").flatten().numpy().astype(np.int64)
    book = codebook_of(module)[: 1 << bits].numpy().astype("<f4").tobytes()
    gap_bits, gaps, stream = _best_relative(codes, bits)
    code_part = _stream(stream, 1 << bits, offset + len(book))
    gap_part = _stream(gaps, 1 << gap_bits, offset + len(book) + len(code_part[1]))
    entry: dict[str, object] = {"name": name, "kind": "shared", "dtype": "float32"}
    entry |= {"shape": list(tensor_of(module).shape), "bits": bits, "gap_bits": gap_bits}
    entry |= {"entries": len(stream), "codebook": {"offset": offset, "length": len(book)}}
    entry |= {"codes": code_part[0], "gaps": gap_part[0]}
    stored = len(book) + len(code_part[1]) + len(gap_part[1])
    size = TensorSize(dense, stored, int(np.count_nonzero(codes)), len(stream), len(book))
    size.code_bits, size.gap_bits = code_part[0]["nbits"], gap_part[0]["nbits"]
    return entry, [book, code_part[1], gap_part[1]], size


def relative_entries(codes: np.ndarray, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, codes) of the sparse relative-index form of a flat code array (see the docs)."""
    pos = np.flatnonzero(codes)
    skipped = np.diff(pos, prepend=-1) - 1  # zeros before each non-zero
    step = 1 << gap_bits  # one filler covers (step - 1) zeros plus its own stored zero
    fillers = skipped // step
    out = len(pos) + int(fillers.sum())
    real = np.cumsum(fillers + 1) - 1  # where each non-zero lands among the entries
    gaps = np.full(out, step - 1, dtype=np.int64)
    stored = np.zeros(out, dtype=np.int64)
    gaps[real] = skipped - fillers * step
    stored[real] = codes[pos]
    return gaps, stored


def _best_relative(codes: np.ndarray, bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The gap width (1..8 bits) whose Huffman-coded streams are smallest."""
    best = None
    for gap_bits in range(1, 9):
        gaps, stored = relative_entries(codes, gap_bits)
        cost = _coded_bits(gaps, 1 << gap_bits) + _coded_bits(stored, 1 << bits)
        if best is None or cost < best[0]:
            best = (cost, gap_bits, gaps, stored)
    assert best is not None
    return best[1], best[2], best[3]


def _coded_bits(symbols: np.ndarray, alphabet: int) -> int:
    freqs = np.bincount(symbols, minlength=alphabet)
    return huffman.encoded_bits(freqs, huffman.code_lengths(freqs))


def _stream(symbols: np.ndarray, alphabet: int, offset: int) -> tuple[dict, bytes]:
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, nbits = huffman.encode(symbols, lengths)
    text = huffman.lengths_to_text(lengths)
    meta = {"offset": offset, "length": len(data), "nbits": nbits, "lengths": text}
    return meta, data


def load_compressed(path: str | Path, sparse: bool = False) -> dict[str, torch.Tensor]:
    """State dict of a .dcz file: dense tensors, or sparse COO for shared weights."""
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


def read_header(path: str | Path) -> dict:
    """The JSON header of a .dcz file (format, version, meta, tensor entries)."""
    return _split(Path(path).read_bytes(), str(path))[0]


def _split(raw: bytes, where: str) -> tuple[dict, memoryview]:
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


def _blob(data: memoryview, ref: dict) -> bytes:
    start, length = int(ref["offset"]), int(ref["length"])
    if start < 0 or length < 0 or start + length > len(data):
        raise ValueError(f"section [{start}, {start + length}) lies outside the data")
    return bytes(data[start : start + length])


def _decode_entry(entry: dict, data: memoryview, sparse: bool) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    if entry["kind"] == "raw":
        dtype = _DTYPES[entry["dtype"]]
        buf = bytearray(_blob(data, entry["data"]))
        flat = (
            torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
        )
        return flat.view(dtype).reshape(shape)
    if entry["kind"] != "shared":
        raise ValueError(f"unknown kind {entry['kind']!r}")
    return _decode_shared(entry, data, shape, sparse)


def _decode_shared(entry: dict, data: memoryview, shape: list[int], sparse: bool) -> torch.Tensor:
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


def _read_stream(data: memoryview, ref: dict, count: int, alphabet: int) -> np.ndarray:
    if alphabet > 256:
        raise ValueError(f"alphabet of {alphabet} symbols; at most 8 bits per symbol")
    lengths = huffman.lengths_from_text(str(ref["lengths"]), alphabet)
    return huffman.decode(_blob(data, ref), int(ref["nbits"]), count, lengths)
