"""Shared by the pruning, distillation and DDP reproductions: Fashion-MNIST and machine facts.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (apt-get install -y
dataset-fashion-mnist): IDX files, gzipped, in /usr/share/datasets/fashion-mnist/.
"""

from __future__ import annotations

import gzip
import os
import platform
import struct
import sys
from pathlib import Path

import numpy as np
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format; gzipped or not) as a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned bytes, the only type MNIST uses
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (FASHION / name).exists():
            return FASHION / name
    sys.exit(f"{FASHION}/{stem}[.gz] missing: apt-get install -y dataset-fashion-mnist")


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (60000, 784) float32 in [0, 1], y_train int64, x_test (10000, 784), y_test)."""
    parts = []
    for split in ("train", "t10k"):
        x = read_idx(_find(f"{split}-images-idx3-ubyte")).reshape(-1, 784)
        y = read_idx(_find(f"{split}-labels-idx1-ubyte"))
        parts += [
            torch.from_numpy(x.astype(np.float32) / 255),
            torch.from_numpy(y.astype(np.int64)),
        ]
    return parts[0], parts[1], parts[2], parts[3]


def machine_facts() -> dict[str, str]:
    """CPU model and flags, cores, torch threads and version, load average right now."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2",)]
    return {
        "cpu": model,
        "flags": " ".join(keep),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def facts_markdown(facts: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in facts.items())
