"""Process-group setup for data-parallel training under `torchrun`.

`torchrun --nproc_per_node=N script.py` starts N processes and tells each its rank through the
`env://` rendezvous that `torch.distributed.init_process_group` reads itself; nothing here reads
the environment. Outside torchrun everything degrades to one process (rank 0 of 1).

Backend: NCCL when the model trains on CUDA, gloo on CPU. Only rank 0 should write files or
log progress (`is_main_process()`).

How the processes split the work (`parallel.py`) is chosen once, when the process joins:
`init_distributed(parallel="dp=2,pp=2")`; without it every process is a DDP replica. The
layout is a property of the process group, like the world size, so `fit` reads it from here
rather than from each caller's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from slimserve.train.parallel import Layout, ParallelSpec, build_layout, check_world


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: `rank` of `world_size`, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    layout: Layout = field(default_factory=lambda: Layout(ParallelSpec()))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device_for(rank: int, want: str | None) -> torch.device:
    if want is not None and not want.startswith("cuda"):
        return torch.device(want)
    if torch.cuda.is_available() and want is not None:
        # One GPU per process on a node; torchrun numbers ranks node by node.
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


_layout: Layout | None = None  # set by init_distributed(parallel=...); None: DDP over all


def init_distributed(
    device: str | None = None, parallel: ParallelSpec | None = None
) -> DistContext:
    """Join the process group when launched by torchrun (idempotent); else one process.

    `device`: "cpu", "cuda" or None (CPU). `parallel`: how the processes split the work (its
    product must equal the world size); None keeps the layout chosen before (default: every
    process a DDP replica). Returns this process's context.
    """
    global _layout
    if not dist.is_available():
        if parallel is not None:
            check_world(parallel, 1)
        return DistContext(device=_device_for(0, device))
    if not dist.is_initialized() and dist.is_torchelastic_launched():
        backend = "nccl" if _device_for(0, device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if parallel is not None:
        _layout = build_layout(parallel, _device_for(_rank(), device))
    return context(device)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def context(device: str | None = None) -> DistContext:
    """The current process's context, without joining anything."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=_device_for(0, device))
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = _layout or Layout(ParallelSpec(dp=world), replica=rank)
    return DistContext(rank, world, _device_for(rank, device), str(dist.get_backend()), layout)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and logs."""
    return context().is_main


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (call once at the end of a torchrun script, on every rank).

    Waits for every rank first: a rank that tears gloo down while its peer is still writing
    its results can abort the peer's transport thread.
    """
    global _layout
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _layout = None
