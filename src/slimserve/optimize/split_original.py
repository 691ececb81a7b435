"""`slimserve optimize --parallel pp=N`: the original as pipeline stages, never whole in a process.

When every recipe starts with `distill` (the original is then only ever the teacher, which
distillation does not change) and the original is a torch model stored as model.safetensors
whose class gives its pipeline blocks, each process loads only its stage
(`artifacts.load_torch_stage`: built on the meta device, its stage's tensors read from the
file) and that one stage-sliced module is the teacher of every recipe. Any other recipe needs
the original whole (fine-tuning it, pruning it), so then it is loaded whole as in one process.

Its profile, measured without any process holding it whole:
- outputs (the reference the variants are compared with, accuracy): exact, the stages run in
  turn on the evaluation rows, each stage's output broadcast to the next;
- size_bytes: the safetensors file; parameters, nonzeros and memory_bytes: summed over stages;
- latency: each stage is timed in its own process on its real input, one stage at a time (the
  others wait, so they do not share the cores), and the stages' times are added: the compute
  of the whole forward, without the hand-offs between processes. A p99 is the sum of the
  stages' p99s. `profile["measured"]` says so.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.artifacts import TorchFiles, build_module, find_file
from slimserve.optimize.evaluation import (
    as_predictor,
    batch_of,
    fidelity,
    latency_summary,
    machine_facts,
    size_on_disk,
    time_batch,
    weight_stats,
)
from slimserve.optimize.recipe import Recipe
from slimserve.repository.schema import ModelConfig
from slimserve.train.distributed import context
from slimserve.train.pipeline import share_stage_output
from slimserve.train.stages import has_blocks, pipeline_blocks, split_blocks

Arrays = tuple[Any, np.ndarray | None]


def split_files(vdir: Path, config: ModelConfig, recipes: list[Recipe]) -> TorchFiles | None:
    """The original's files when this run keeps it split over pipeline stages (module
    docstring), else None (load it whole)."""
    stages = context().layout.spec.pp
    if stages == 1 or config.backend != "torch" or not config.model_class:
        return None
    if (vdir / "model.dcz").is_file() or not all(
        r.steps and r.steps[0].spec.name == "distill" for r in recipes
    ):
        return None
    find_file(vdir, ".safetensors")  # a clear error now when the artifact is missing
    files = TorchFiles(vdir, config.model_class, dict(config.model_args))
    return files if has_blocks(meta_model(files)) else None


def meta_model(files: TorchFiles) -> nn.Module:
    """The model built on the meta device: shapes, no memory."""
    with torch.device("meta"):
        model: nn.Module = build_module(files.model_class, files.model_args)
    return model


def run_on_meta(files: TorchFiles, x: Any) -> None:
    """Run the model on the meta device with inputs shaped like `x` (numpy): raises where the
    shapes do not fit, without loading a weight."""
    if isinstance(x, dict):
        raise InvalidArgument("pipeline stages take one input tensor; this data has several")
    with torch.no_grad():
        meta_model(files)(torch.from_numpy(np.ascontiguousarray(x)).to("meta"))


def _stage(model: nn.Module) -> nn.Sequential:
    layout = context().layout
    blocks = pipeline_blocks(model)
    start, end = split_blocks(blocks, layout.spec.pp)[layout.stage]
    return nn.Sequential(*blocks[start:end]).eval()


@torch.no_grad()
def _stage_input_and_output(stage: nn.Module, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """This stage's input and the last stage's output for rows `x`: the stages run in turn,
    each one's output broadcast to the pipeline."""
    ctx = context()
    layout = ctx.layout
    current = torch.from_numpy(np.ascontiguousarray(x))
    mine = current
    for s in range(layout.spec.pp):
        if layout.stage == s:
            mine = current
        out = stage(current) if layout.stage == s else None
        current = share_stage_output(out, layout, ctx.device, s)
    return mine, current


def _stage_latency(
    stage: nn.Module, inputs: torch.Tensor, batch_sizes: tuple[int, ...], threads: int | None,
    min_time_s: float,
) -> torch.Tensor:  # fmt: skip
    """(p50, p99) milliseconds per batch size of this stage, timed while the others wait."""
    layout = context().layout
    predict = as_predictor(stage, threads)
    rows = inputs.numpy()
    times = torch.zeros(len(batch_sizes), 2, dtype=torch.float64)
    for s in range(layout.spec.pp):
        dist.barrier(group=layout.pp_group)
        if layout.stage != s:
            continue
        for i, size in enumerate(batch_sizes):
            t = time_batch(predict, batch_of(rows, size), min_time_s)
            times[i] = torch.tensor([np.percentile(t, 50), np.percentile(t, 99)])
    dist.barrier(group=layout.pp_group)
    return times


def profile_split(
    model: nn.Module, files: TorchFiles, evaluation: Arrays, opts: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """The original's outputs on the evaluation rows and its profile (module docstring); every
    process of the pipeline takes part, the profile is whole on each."""
    x, y = evaluation
    stage = _stage(model)
    inputs, reference = _stage_input_and_output(stage, x)
    sizes = tuple(opts.batch_sizes)
    times = _stage_latency(stage, inputs, sizes, opts.threads, opts.min_time_s)
    stats = weight_stats(stage)
    counts = torch.tensor([stats[k] for k in ("parameters", "nonzeros", "memory_bytes")])
    group = context().layout.pp_group
    dist.all_reduce(times, group=group)
    dist.all_reduce(counts, group=group)
    out = reference.numpy()
    profile: dict[str, Any] = {"size_bytes": size_on_disk(find_file(files.folder, ".safetensors"))}
    profile.update(zip(("parameters", "nonzeros", "memory_bytes"), counts.tolist(), strict=True))
    per_batch = {s: (float(t[0]), float(t[1])) for s, t in zip(sizes, times, strict=True)}
    profile.update(latency_summary(per_batch))
    if y is not None and not opts.embedding:
        profile["accuracy"] = float((out.argmax(-1) == y).mean())
    profile.update(fidelity(out, out.astype(np.float64), opts.embedding))
    profile["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    profile["measured"] = (
        f"split over {context().layout.spec.pp} pipeline stages, never whole in one process: "
        "outputs exact; latency = the sum of the stages' times, each timed alone in its own "
        "process (compute only, no hand-off between processes)"
    )
    profile["machine"] = machine_facts(opts.threads)
    return out, profile
