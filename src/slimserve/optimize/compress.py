"""Deep Compression storage (Han et al. 2016): weight sharing, relative sparse indices, Huffman.

1. `share_weights_(model, WeightSharing(bits=5))` (from `slimserve.optimize.sharing`, also
   importable here): k-means codes per layer; the module gets a uint8 buffer `weight_codes`.
2. `finetune_centroids(...)`: trains the shared values (gradients summed per cluster).
3. `save_compressed(model, path)`: writes a `.dcz` file (below); `load_compressed(path)` gives
   back a state dict[str, Any] of dense (or sparse) tensors equal bit for bit to the shared model's.

The file format and its reader live with the runtimes (`slimserve.runtimes.dcz`), which load it
without importing `slimserve.optimize`; this module writes it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimserve.errors import InvalidArgument
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
from slimserve.runtimes import huffman
from slimserve.runtimes.dcz import DTYPES, MAGIC, VERSION, load_compressed, read_header

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

_NAMES = {v: k for k, v in DTYPES.items()}


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
    model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None
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


def encode_model(
    model: nn.Module, meta: dict[str, Any] | None = None
) -> tuple[bytes, CompressionStats]:
    """The .dcz bytes of `model` and their size breakdown."""
    entries: list[dict[str, Any]] = []
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
) -> tuple[dict[str, Any], list[bytes], TensorSize]:
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
) -> tuple[dict[str, Any], list[bytes], TensorSize]:
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


def _stream(symbols: np.ndarray, alphabet: int, offset: int) -> tuple[dict[str, Any], bytes]:
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, nbits = huffman.encode(symbols, lengths)
    text = huffman.lengths_to_text(lengths)
    meta = {"offset": offset, "length": len(data), "nbits": nbits, "lengths": text}
    return meta, data
