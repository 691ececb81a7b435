"""Keep large freed buffers in the process instead of returning them to the kernel (glibc).

A forward allocates many activation buffers of megabytes. glibc serves each allocation above
its mmap threshold (at most 32 MiB, adapting) with a fresh mmap and unmaps it on free, so every
forward page-faults its buffers in again. Measured on the issue's machine, one thread, an
int8 576 -> 3072 layer on 1024 rows: 80 ms per call with glibc's defaults, 8 ms with large
buffers kept. Process-wide: loading a text-generation model opts the server in
(runtimes/generation.py), as the throughput benchmark does; the cost is that the process keeps
its peak heap (activation-sized, not weight-sized).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = 1 << 30  # bytes: buffers below 1 GiB come from the heap, which is never trimmed
_state = {"tuned": False}


def tuned() -> bool:
    """Whether `keep_freed_memory` has tuned this process's malloc."""
    return _state["tuned"]


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for large short-lived buffers; False where it is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if _state["tuned"]:
        return True
    settings = ((_M_MMAP_THRESHOLD, _KEEP), (_M_TRIM_THRESHOLD, _KEEP), (_M_TOP_PAD, 64 << 20))
    _state["tuned"] = all(mallopt(option, value) == 1 for option, value in settings)
    return _state["tuned"]
