"""Helpers for the multi-process training tests: real torchrun launches, worker modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def load_worker(path: Path) -> ModuleType:
    """A worker script imported as a module (for its single-process reference run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(procs: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node=PROCS ARGS...`, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={procs}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
