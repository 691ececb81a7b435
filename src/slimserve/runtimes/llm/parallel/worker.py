"""One model-parallel worker: a pipeline stage's layers (a tensor rank's share).

Started by a launcher (runtimes/launch.py): a child process of the server (local.py, entry
point `main`) or a Ray actor (cluster/ray_group.py), both around the same `Worker`. It joins the
group's torch.distributed process group (gloo: the forward runs on the CPU), reads its shard
(shard.py), then answers the driver's messages (`Worker.handle`):

    allocate {num_blocks, block_size}  -> its KV pool (its layers, its KV heads); replies bytes
    forward  {batch tensors, micro, all_logits}
             the rows in `micro` micro-batches: stage s computes micro-batch i while stage s+1
             computes i-1 (hidden states go on with isend); the last stage's rank 0 replies
             the logits. Every rank gets the same batch metadata each step.
    stats    -> seconds in forwards and waiting on peers
    stop     (local processes: the loop ends)

Any exception is reported to the driver (`error`) and the worker ends: the driver fails the
requests in flight and restarts the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimserve.runtimes.launch import WorkerSpec
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


def main(spec: WorkerSpec, conn: Connection) -> None:
    """A local worker process's entry point: the driver's messages on `conn` until `stop`."""
    try:
        worker = Worker(spec)
        conn.send_bytes(worker.loaded())
        while True:
            fields, tensors = decode(conn.recv_bytes())
            if fields["op"] == "stop":
                return
            reply = worker.handle(fields, tensors)
            if reply is not None:
                conn.send_bytes(reply)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the driver is gone or stopping us
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the step
        with contextlib.suppress(OSError):
            conn.send_bytes(encode({"op": "error", "message": spec.failure(exc)}))
    finally:
        close()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Worker:
    """One rank's shard, KV pool and forward (see the module docstring)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        torch.set_num_threads(spec.threads)
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

    def loaded(self) -> bytes:
        """The reply that says this rank has read its shard."""
        return encode({"op": "loaded", "bytes": self.shard.model.nbytes()})

    def handle_bytes(self, message: bytes) -> bytes | None:
        return self.handle(*decode(message))

    def handle(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes | None:
        """One (decoded) message from the driver; its reply, or None where none is due."""
        with torch.inference_mode():
            if fields["op"] == "allocate":
                return self._allocate(int(fields["num_blocks"]), int(fields["block_size"]))
            if fields["op"] == "stats":
                return encode({"op": "stats", **self.times})
            if fields["op"] != "forward":
                raise ValueError(f"unknown message {fields['op']!r}")
            start = time.perf_counter()
            reply = self._forward(fields, tensors)
            self.times["forward_s"] += time.perf_counter() - start
            self.times["steps"] += 1
            return reply

    def _allocate(self, num_blocks: int, block_size: int) -> bytes:
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
        return encode({"op": "allocated", "weights": weights, "kv": kv, "pid": os.getpid()})

    def _forward(self, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes | None:
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
        if not outputs:
            return None
        return encode({"op": "logits"}, {"logits": torch.cat(outputs)})

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
