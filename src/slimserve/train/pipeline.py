"""Pipeline-parallel training and inference with `torch.distributed.pipelining`.

The model is cut into `pp` stages of consecutive blocks (`pipeline_blocks`), balanced by
parameter count; stage s runs on the process at coordinate s of the mesh's "pp" axis. Each
batch is cut into micro-batches that flow through the stages on the 1F1B schedule (one forward,
one backward in the steady state: at most `pp` micro-batches' activations are alive per stage,
against all of them with GPipe). With dp x pp, each pipeline takes its share of the batch and
the stages' gradients are averaged over the replicas of that stage once per step.

Exactness: every micro-batch has the same shape (a short last batch is padded with rows that
carry no weight), and each micro-batch's loss is weighted by its share of real rows, so the
sum the schedule backpropagates is the batch-mean loss of one process, up to float summation
order.

Every process keeps the whole model object (it was built or loaded whole); it trains only its
stage's blocks, and `finish` broadcasts each stage's trained weights to the others. For
inference with a model too large to keep whole, `pipeline_forward(..., release=True)` frees the
other stages' weights in each process first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from slimserve.errors import InvalidArgument
from slimserve.train.distributed import DistContext
from slimserve.train.engines import autocast
from slimserve.train.losses import Batch, Criterion
from slimserve.train.parallel import Layout
from slimserve.train.stages import pipeline_blocks, split_blocks


def _stage_module(
    model: nn.Module, stages: int, stage: int
) -> tuple[nn.Module, list[list[nn.Module]]]:
    blocks = pipeline_blocks(model)
    ranges = split_blocks(blocks, stages)
    a, b = ranges[stage]
    return nn.Sequential(*blocks[a:b]), [blocks[s:e] for s, e in ranges]


def microbatch_count(rows: int, stages: int, wanted: int | None) -> int:
    """Micro-batches per step: `wanted`, else 2 x stages (or stages) when it divides rows."""
    if wanted is not None:
        if wanted < stages or rows % wanted:
            raise InvalidArgument(
                f"microbatches={wanted}: use at least the {stages} stages, dividing the "
                f"{rows} rows each pipeline takes per step"
            )
        return wanted
    for m in (2 * stages, stages):
        if rows % m == 0:
            return m
    raise InvalidArgument(
        f"batch_size: each pipeline takes {rows} rows per step, which {stages} stages cannot "
        f"split into equal micro-batches; use a batch size that is a multiple of "
        f"{stages} x the data-parallel degree"
    )


class PipelineEngine:
    """One stage of a pipeline; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        criterion: Criterion,
        ctx: DistContext,
        precision: str,
        rows: int,
        microbatches: int | None = None,
    ) -> None:
        layout = ctx.layout
        stages = layout.spec.pp
        self.module: nn.Module
        self.module, self.parts = _stage_module(model, stages, layout.stage)
        self.layout, self.device, self.precision, self.rows = layout, ctx.device, precision, rows
        self.criterion = criterion
        self.first, self.last = layout.stage == 0, layout.stage == stages - 1
        self.count = microbatch_count(rows, stages, microbatches)
        self.schedule: Schedule1F1B | None = None  # built on the first batch (its shapes)
        self._targets: tuple[torch.Tensor, ...] = ()
        self._real = rows

    def _build(self, x: torch.Tensor) -> Schedule1F1B:
        """The stage with its input and output shapes given (static mode). Left to infer them,
        torch runs each stage's forward once on uninitialised tensors in training mode, which
        would feed garbage into buffers that track statistics (QAT ranges, batch norm)."""
        example = _pad(x, self.rows)[: self.rows // self.count]
        inputs = outputs = example
        with torch.no_grad(), autocast(self.precision, self.device), _eval(self.parts):
            for stage, blocks in enumerate(self.parts):
                inputs = outputs
                for block in blocks:
                    outputs = block(outputs)
                if stage == self.layout.stage:
                    break
        # Metadata as in training: activations between stages carry gradients.
        outputs = outputs.detach().requires_grad_(True)
        inputs = inputs.detach().requires_grad_(not self.first)
        stage_ = PipelineStage(
            self.module, self.layout.stage, self.layout.spec.pp, self.device,
            input_args=inputs, output_args=outputs, group=self.layout.pp_group,
        )  # fmt: skip
        # scale_grads=False: _loss already weighs each micro-batch by its share of the rows.
        return Schedule1F1B(stage_, self.count, loss_fn=self._loss, scale_grads=False)

    def forward_backward(self, batch: Batch, scale: float) -> torch.Tensor | None:
        x, *targets = batch
        if self.schedule is None:
            self.schedule = self._build(x)
        real = len(x)
        self._targets, self._real = tuple(targets), real
        index = torch.full((self.rows,), -1, dtype=torch.long, device=x.device)
        index[:real] = torch.arange(real, device=x.device)  # -1: padding, no weight
        losses: list[torch.Tensor] = []
        with autocast(self.precision, self.device):
            if self.first:
                self.schedule.step(_pad(x, self.rows))
            else:
                self.schedule.step(target=index, losses=losses)
        self._average_over_replicas()
        if not self.last:
            return None
        return torch.stack(losses).sum().detach()

    def _loss(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        keep = index >= 0
        rows = index[keep]
        if len(rows) == 0:
            return out.sum() * 0  # a micro-batch of padding only: no gradient
        loss = self.criterion(out[keep], *(t[rows] for t in self._targets))
        return loss * (len(rows) / self._real)

    def _average_over_replicas(self) -> None:
        group, n = self.layout.replica_group, self.layout.spec.replicas
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if n == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)  # one all-reduce per step, not one per tensor
        dist.all_reduce(flat, group=group)
        flat /= n
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(avg)

    def clip(self, max_norm: float) -> None:
        """The global norm: squared norms summed over the stages, then one scale for all."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = torch.stack([g.detach().float().norm() ** 2 for g in grads]).sum()
        dist.all_reduce(local, group=self.layout.pp_group)
        factor = (max_norm / (local.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, factor.item())

    def finish(self, model: nn.Module) -> None:
        broadcast_stages(self.parts, self.layout)


@contextlib.contextmanager
def _eval(parts: list[list[nn.Module]]) -> Iterator[None]:
    """Every block in eval mode for a while (buffers untouched), then as it was."""
    blocks = [b for blocks in parts for b in blocks]
    modes = [b.training for b in blocks]
    try:
        for b in blocks:
            b.eval()
        yield
    finally:
        for b, mode in zip(blocks, modes, strict=True):
            b.train(mode)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with rows - len(x) copies of its first row appended (they get no weight)."""
    if len(x) == rows:
        return x
    return torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


@torch.no_grad()
def broadcast_stages(parts: list[list[nn.Module]], layout: Layout) -> None:
    """Every stage's weights and buffers from the process that holds it to its pipeline."""
    for stage, blocks in enumerate(parts):
        for block in blocks:
            for t in [*block.parameters(), *block.buffers()]:
                dist.broadcast(t.data, group=layout.pp_group, group_src=stage)


@torch.no_grad()
def pipeline_forward(
    model: nn.Module, x: torch.Tensor, ctx: DistContext, batch_size: int = 1024,
    release: bool = False,
) -> torch.Tensor:  # fmt: skip
    """`model(x)` in eval mode with the model cut into this layout's stages: each process runs
    only its stage; the outputs (float32) are broadcast to every process of the pipeline.

    release=True first frees the weights of the other stages in this process (the model is
    unusable afterwards): a teacher too large to keep whole in one process fits in `pp`.
    """
    layout = ctx.layout
    stages = layout.spec.pp
    module, parts = _stage_module(model, stages, layout.stage)
    if release:
        _release([b for s, blocks in enumerate(parts) if s != layout.stage for b in blocks])
    was_training = model.training
    model.eval()
    rows = max(stages, min(batch_size, len(x)) // stages * stages)
    stage = PipelineStage(module, layout.stage, stages, ctx.device, group=layout.pp_group)
    schedule = ScheduleGPipe(stage, stages)  # no loss: forward only
    outs = []
    for chunk in x.split(rows):
        out = schedule.step(_pad(chunk.to(ctx.device), rows)) if layout.stage == 0 else None
        if layout.stage != 0:
            out = schedule.step()
        last = layout.spec.pp - 1
        outs.append(share_stage_output(out, layout, ctx.device, last)[: len(chunk)])
    model.train(was_training)
    return torch.cat(outs)


def share_stage_output(
    out: torch.Tensor | None, layout: Layout, device: torch.device, stage: int
) -> torch.Tensor:
    """Stage `stage`'s output (float32) on every process of the pipeline (shape sent first)."""
    shape = torch.zeros(8, dtype=torch.long, device=device)
    if out is not None and layout.stage == stage:
        out = out.float().contiguous()
        shape[0] = out.dim()
        shape[1 : 1 + out.dim()] = torch.tensor(out.shape)
    dist.broadcast(shape, group=layout.pp_group, group_src=stage)
    if layout.stage != stage or out is None:
        out = torch.empty(shape[1 : 1 + int(shape[0])].tolist(), device=device)
    dist.broadcast(out, group=layout.pp_group, group_src=stage)
    return out.cpu()


def _release(blocks: list[nn.Module]) -> None:
    """Free the blocks' tensors. Those on the meta device (a stage never loaded, as
    optimize.artifacts.load_torch_stage leaves them) hold no memory and keep their shapes, so
    the model still splits into the same stages and can run pipelined again."""
    for block in blocks:
        for t in [*block.parameters(), *block.buffers()]:
            if not t.is_meta:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
