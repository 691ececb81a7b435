"""How one training step runs across this run's processes: the engines behind `fit`.

An engine owns what the optimizer steps (`module`), runs forward and backward for one batch,
clips gradients by their global norm, and at the end puts the trained weights back into the
caller's model on every process (`finish`), so what follows `fit` (evaluation, quantization,
saving) sees one ordinary module whatever the layout was.

- `ReplicaEngine`: one process, or DDP over the replicas (gradients all-reduced in backward).
- `ShardedEngine`: FSDP2 (`fully_shard`): each replica keeps 1/N of every parameter, gradient
  and optimizer moment; a layer's full weight is all-gathered just for its forward/backward.
- `PipelineEngine` (pipeline.py): stages across processes, micro-batches, 1F1B.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from slimserve.errors import InvalidArgument
from slimserve.train.distributed import DistContext
from slimserve.train.losses import Batch
from slimserve.train.stages import has_blocks, pipeline_blocks

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class Engine(Protocol):
    module: nn.Module  # the parameters this process's optimizer steps

    def forward_backward(self, batch: Batch, scale: float) -> torch.Tensor | None:
        """Gradients of `loss * scale` into `module`; the batch's loss where this process
        computes it (every process but the non-last pipeline stages), else None."""
        ...

    def clip(self, max_norm: float) -> None:
        """Scale the gradients so that their norm over the whole model is at most max_norm."""
        ...

    def finish(self, model: nn.Module) -> None:
        """The trained weights into `model`, identical on every process."""
        ...


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if mixed_precision == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class ReplicaEngine:
    """The whole model in every process; DDP averages gradients when there are several."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, ctx: DistContext, precision: str):
        self.module = model
        self.net: nn.Module = model
        if ctx.is_distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            group = ctx.layout.replica_group
            self.net = DistributedDataParallel(model, device_ids=ids, process_group=group)
        self.loss_fn, self.device, self.precision = loss_fn, ctx.device, precision

    def forward_backward(self, batch: Batch, scale: float) -> torch.Tensor | None:
        with autocast(self.precision, self.device):
            loss = self.loss_fn(self.net, batch)
        (loss * scale if scale != 1 else loss).backward()
        return loss

    def clip(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def finish(self, model: nn.Module) -> None:
        """Nothing to gather: every replica holds the same full weights."""


class ShardedEngine(ReplicaEngine):
    """FSDP2 over the replicas: a sharded copy trains; the caller's model gets the result.

    Each block (`stages.pipeline_blocks`, else each module holding parameters directly)
    becomes its own FSDP unit, so only one layer's full weight is gathered at a time: a block,
    not its inner Linear, because a block such as QAT's fake-quantized twin reads its inner
    layer's weight without calling that layer. Buffers (QAT's range trackers) are not
    sharded; each replica updates its own, and rank 0's are kept at the end. The caller's
    parameters are emptied while the copy trains (their storage would otherwise double what
    sharding saves) and refilled at the end.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, ctx: DistContext, precision: str):
        if any(n.endswith("_mask") for n, _ in model.named_buffers()):
            raise InvalidArgument(
                "--parallel fsdp cannot retrain a pruned model (its masks are per full "
                "weight, FSDP holds shards); use dp=N or pp=N for this step"
            )
        sharded = copy.deepcopy(model)
        mesh = ctx.layout.replica_mesh()
        for unit in _units(sharded):
            fully_shard(unit, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        with torch.no_grad():
            for p in model.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.module = self.net = sharded
        self.loss_fn, self.device, self.precision = loss_fn, ctx.device, precision
        self.group = ctx.layout.replica_group

    def finish(self, model: nn.Module) -> None:
        assert isinstance(self.module, FSDPModule)
        full = {k: _full(v) for k, v in self.module.state_dict().items()}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                if name in params:
                    params[name].data = value
            model.load_state_dict(full)
            for buffer in model.buffers():  # every replica leaves with rank 0's buffers
                dist.broadcast(buffer, group=self.group, group_src=0)


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP gathers one at a time (see ShardedEngine)."""
    if has_blocks(model):
        return [b for b in pipeline_blocks(model) if any(True for _ in b.parameters())]
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))][1:]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard's full value (an all-gather); a plain tensor as it is."""
    value = t.full_tensor() if isinstance(t, DTensor) else t
    return value.detach().clone()
