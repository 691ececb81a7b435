"""One model-parallel worker process: a pipeline stage's layers (a tensor rank's share).

Started by the driver (group.py) with `spawn`. It joins the group's torch.distributed
process group (gloo: the forward runs on the CPU), reads its shard (shard.py), then serves
the driver's messages on its pipe until `stop` or the pipe closes (the driver is gone):

    allocate {num_blocks, block_size}  -> its KV pool (its layers, its KV heads); replies bytes
    forward  {batch tensors, micro, all_logits}
             the rows in `micro` micro-batches: stage s computes micro-batch i while stage s+1
             computes i-1 (hidden states go on with isend); the last stage's rank 0 replies
             the logits. Every rank gets the same batch metadata each step.
    stop

Any exception is reported on the pipe (`error`) and the process exits: the driver fails the
requests in flight and restarts the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimserve.runtimes.llm.model import (
    Batch,
    compute_dtype,
    embed,
    head,
    new_kv_pool,
    run_layers,
)
from slimserve.runtimes.llm.parallel.plan import Plan, make_plan
from slimserve.runtimes.llm.parallel.shard import Shard, dims_of, load_shard
from slimserve.runtimes.llm.parallel.wire import decode, encode
from slimserve.runtimes.llm.runtime import linear_maker

MiB = 2**20


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker is started with (plain values: it crosses the process boundary)."""

    folder: str
    config: dict[str, Any]  # the transformers config's to_dict(): no transformers import here
    weights: str
    pipeline: int
    tensor: int
    rank: int
    address: str  # tcp://127.0.0.1:PORT of the rendezvous
    threads: int  # torch intra-op threads
    budget_bytes: int  # weights + KV this process may hold (0: unchecked)
    timeout_s: float  # collectives fail after this long (a peer gone)


def main(spec: WorkerSpec, conn: Connection) -> None:
    """The process's entry point."""
    try:
        torch.set_num_threads(spec.threads)
        worker = _Worker(spec, conn)
        conn.send_bytes(encode({"op": "loaded", "bytes": worker.shard.model.nbytes()}))
        worker.serve()
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the driver is gone or stopping us
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the step
        stage, tp = divmod(spec.rank, spec.tensor)
        _send(conn, {"op": "error", "message": f"stage {stage} rank {tp}: {exc}"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _send(conn: Connection, fields: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.send_bytes(encode(fields))


class _Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection) -> None:
        self.spec, self.conn = spec, conn
        dist.init_process_group(
            "gloo",  # the forward is oneDNN on the CPU (model.py): NCCL would need CUDA tensors
            init_method=spec.address,
            rank=spec.rank,
            world_size=spec.pipeline * spec.tensor,
            timeout=timedelta(seconds=spec.timeout_s),
        )
        config = ConfigView(spec.config)
        self.plan: Plan = make_plan(dims_of(config), spec.pipeline, spec.tensor)
        self.stage, self.tp = self.plan.place(spec.rank)
        self.group = self._tensor_group()
        self.shard: Shard = load_shard(
            Path(spec.folder),
            config,
            linear_maker(spec.weights),
            compute_dtype(spec.weights),
            self.plan,
            spec.rank,
            self._reduce,
        )
        self.pool: torch.Tensor | None = None
        # Seconds of forwards, and of those spent waiting on peers (receiving the previous
        # stage's hidden states, all-reduces, sends completing): transfer plus pipeline bubble.
        self.times = {"forward_s": 0.0, "wait_s": 0.0, "steps": 0.0}

    def _tensor_group(self) -> Any:
        """This stage's tensor ranks (every rank creates every group, in the same order)."""
        if self.plan.tensor == 1:
            return None
        mine = None
        for stage in range(self.plan.pipeline):
            ranks = [self.plan.rank(stage, t) for t in range(self.plan.tensor)]
            group = dist.new_group(ranks)
            mine = group if stage == self.stage else mine
        return mine

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(partial, group=self.group)
        self.times["wait_s"] += time.perf_counter() - start
        return partial

    def serve(self) -> None:
        with torch.inference_mode():
            while True:
                fields, tensors = decode(self.conn.recv_bytes())
                if fields["op"] == "stop":
                    return
                if fields["op"] == "allocate":
                    self._allocate(int(fields["num_blocks"]), int(fields["block_size"]))
                elif fields["op"] == "stats":
                    self.conn.send_bytes(encode({"op": "stats", **self.times}))
                else:
                    start = time.perf_counter()
                    self._forward(fields, tensors)
                    self.times["forward_s"] += time.perf_counter() - start
                    self.times["steps"] += 1

    def _allocate(self, num_blocks: int, block_size: int) -> None:
        self.pool = new_kv_pool(self.shard.model.shape, num_blocks, block_size)
        weights = self.shard.model.nbytes()
        kv = self.pool.numel() * self.pool.element_size()
        budget = self.spec.budget_bytes
        if budget and weights + kv > budget:
            raise MemoryError(
                f"this process needs {weights / MiB:.1f} MiB of weights + {kv / MiB:.1f} MiB "
                f"of KV cache, over its memory budget of {budget / MiB:.1f} MiB; raise "
                "memory_budget_bytes, lower kv_cache_bytes or raise pipeline_parallel"
            )
        self.conn.send_bytes(
            encode({"op": "allocated", "weights": weights, "kv": kv, "pid": os.getpid()})
        )

    def _forward(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if self.pool is None:
            raise RuntimeError("forward before allocate")
        model, shard, plan = self.shard.model, self.shard, self.plan
        batch = Batch(
            tensors["tokens"],
            tensors["positions"],
            tensors["slots"],
            tensors["block_tables"],
            tensors["last"],
        )
        sends, outputs = [], []
        for part in split_rows(batch, int(fields["micro"])):
            x = embed(model, part) if shard.first else self._receive(part)
            x = run_layers(model, self.pool, part, x)
            if shard.last:
                if self.tp == 0:
                    outputs.append(head(model, x, part, bool(fields["all_logits"])))
            else:
                handle = dist.isend(x.contiguous(), dst=plan.rank(self.stage + 1, self.tp))
                if handle is not None:
                    sends.append(handle)
        start = time.perf_counter()
        for handle in sends:
            handle.wait()
        self.times["wait_s"] += time.perf_counter() - start
        if outputs:
            self.conn.send_bytes(encode({"op": "logits"}, {"logits": torch.cat(outputs)}))

    def _receive(self, part: Batch) -> torch.Tensor:
        """The previous stage's hidden states (rows, T, D) fp32 for this micro-batch."""
        rows, width = part.tokens.shape
        x = torch.empty(rows, width, self.shard.model.shape.hidden)
        start = time.perf_counter()
        dist.recv(x, src=self.plan.rank(self.stage - 1, self.tp))
        self.times["wait_s"] += time.perf_counter() - start
        return x


class ConfigView:
    """A transformers config's values read as attributes, as model.shape_of reads them."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """`parts` contiguous row ranges (in order: a row may read the prefix blocks an earlier
    row of the same forward writes, see engine._allocate_prompt)."""
    rows, width = batch.tokens.shape
    parts = max(1, min(parts, rows))
    slots = batch.slots.view(rows, width)
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [
        dataclasses.replace(
            batch,
            tokens=batch.tokens[a:b],
            positions=batch.positions[a:b],
            slots=slots[a:b].reshape(-1),
            block_tables=batch.block_tables[a:b],
            last=batch.last[a:b],
        )
        for a, b in itertools.pairwise(bounds)
    ]
