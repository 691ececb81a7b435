"""How the processes of one training run split the work: `--parallel dp=2,pp=2`.

`ParallelSpec` names the degrees: `dp` (replicas, DDP), `fsdp` (replicas whose parameters,
gradients and optimizer state are sharded, FSDP2 `fully_shard`) and `pp` (pipeline stages,
`torch.distributed.pipelining`). Their product must equal the world size torchrun started.
`Layout` is the spec laid on the processes: a DeviceMesh with one dimension per degree above 1,
this process's coordinates on it, and the process groups the engines use.

Mesh order is (dp, pp) or (fsdp, pp): consecutive ranks form one pipeline, so on a multi-GPU
node the stage-to-stage traffic (every micro-batch) stays on the fastest links and only the
gradient all-reduce (once per step) crosses pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from slimserve.errors import InvalidArgument

_DEGREES = ("dp", "fsdp", "pp")


@dataclass(frozen=True)
class ParallelSpec:
    """Degrees of parallelism; 1 means "not split along this axis"."""

    dp: int = 1
    fsdp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in _DEGREES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"--parallel {name}={value!r}: use a whole number >= 1")
        if self.fsdp > 1 and (self.dp > 1 or self.pp > 1):
            raise InvalidArgument(
                f"--parallel {self}: fsdp combines with neither dp nor pp yet; use fsdp=N "
                "alone, or dp=N,pp=M"
            )

    @property
    def size(self) -> int:
        """Processes the spec needs."""
        return self.dp * self.fsdp * self.pp

    @property
    def replicas(self) -> int:
        """How many processes share each batch (the data-parallel degree)."""
        return self.dp * self.fsdp

    def __str__(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in _DEGREES if getattr(self, n) > 1]
        return ",".join(parts) or "dp=1"


def parse_parallel(text: str) -> ParallelSpec:
    """`"pp=2"`, `"dp=2,pp=2"`, `"fsdp=4"` -> ParallelSpec; a clear error for anything else."""
    degrees: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in _DEGREES or not value.isdigit():
            raise InvalidArgument(
                f"--parallel {text!r}: write degrees as NAME=N joined by commas, NAME one of "
                f"{', '.join(_DEGREES)}; e.g. pp=2 or dp=2,pp=2"
            )
        if name in degrees:
            raise InvalidArgument(f"--parallel {text!r}: {name} is given twice")
        degrees[name] = int(value)
    return ParallelSpec(**degrees)


def check_world(spec: ParallelSpec, world_size: int) -> None:
    """The spec must use every process torchrun started, no more, no fewer."""
    if spec.size == world_size:
        return
    launch = f"torchrun --nproc_per_node={spec.size} ..."
    if world_size == 1:
        raise InvalidArgument(
            f"--parallel {spec} needs {spec.size} processes but this is one process; start it "
            f"with {launch}"
        )
    raise InvalidArgument(
        f"--parallel {spec} needs {spec.size} processes (the product of its degrees) but "
        f"torchrun started {world_size}; give degrees whose product is {world_size}, or "
        f"start {launch}"
    )


@dataclass(frozen=True)
class Layout:
    """The spec on this run's processes: the mesh and this process's place on it.

    `mesh` is None in a single process and for plain DDP over every process (the default
    group). `replica_group` joins the replicas of this process's stage (what gradients are
    averaged over; None: the default group); `pp_group` the stages of its pipeline.
    """

    spec: ParallelSpec
    mesh: DeviceMesh | None = None
    replica: int = 0  # index among the data-parallel replicas (dp or fsdp)
    stage: int = 0  # pipeline stage held by this process

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        return self._group("fsdp" if self.spec.fsdp > 1 else "dp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self._group("pp")

    def replica_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this process's replicas (FSDP shards over it)."""
        assert self.mesh is not None, "a single process has no mesh"
        return self.mesh["fsdp" if self.spec.fsdp > 1 else "dp"]

    def _group(self, name: str) -> dist.ProcessGroup | None:
        if self.mesh is None or name not in (self.mesh.mesh_dim_names or ()):
            return None
        return self.mesh.get_group(name)


def build_layout(spec: ParallelSpec, device: torch.device) -> Layout:
    """Lay `spec` on the joined process group (one process: a trivial layout)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_world(spec, world)
    if world == 1:
        return Layout(spec)
    shape = [(n, getattr(spec, n)) for n in _DEGREES if getattr(spec, n) > 1]
    mesh = init_device_mesh(
        device.type, tuple(n for _, n in shape), mesh_dim_names=tuple(k for k, _ in shape)
    )
    names = mesh.mesh_dim_names or ()
    replica_dim = "fsdp" if spec.fsdp > 1 else "dp"
    replica = mesh.get_local_rank(replica_dim) if replica_dim in names else 0
    stage = mesh.get_local_rank("pp") if "pp" in names else 0
    return Layout(spec, mesh, replica, stage)
