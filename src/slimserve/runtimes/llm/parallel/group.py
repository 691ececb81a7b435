"""The driver's side of model-parallel generation: P x T worker processes, one forward a call.

    group = ModelGroup(GroupConfig(folder, "fp32", pipeline=2, tensor=1))   # spawns, loads
    engine = GenerationEngine(group, tokenizer, EngineConfig(...))          # allocates KV
    ... engine.step() calls group.forward(batch, all_logits) -> logits (B, V)

The engine's scheduler, block tables and prefix cache stay here; each step the same batch
metadata goes to every worker (wire.py) and the last stage's rank 0 answers the logits. The
workers come from a launcher (runtimes/launch.py): local processes by default (local.py), Ray
actors in a placement group when the server runs on Ray (cluster/ray_group.py).
A worker that dies, reports an error or does not answer within `step_timeout_s` fails the
step with UNAVAILABLE (503) naming it; every worker is then stopped and a new group starts
in the background (the next forward waits for it), so the model serves again: no hang.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import ModelLoadError, Unavailable
from slimserve.runtimes.launch import WorkerGroup, WorkerLauncher, WorkerLost, WorkerSpec
from slimserve.runtimes.llm.model import Batch, LlamaShape, compute_dtype, shape_of
from slimserve.runtimes.llm.parallel.local import LocalLauncher
from slimserve.runtimes.llm.parallel.plan import Plan, make_plan
from slimserve.runtimes.llm.parallel.shard import dims_of
from slimserve.runtimes.llm.parallel.wire import decode, encode
from slimserve.runtimes.llm.prequant import read_format

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupConfig:
    folder: Path
    weights: str
    pipeline: int = 1
    tensor: int = 1
    threads: int = 1  # torch threads per worker
    budget_bytes: int = 0  # per process: weights + KV (0: unchecked)
    micro_batches: int = 0  # a forward's rows in this many micro-batches (0: pipeline)
    step_timeout_s: float = 60.0  # a forward not answered by then fails (and restarts)
    start_timeout_s: float = 300.0
    # Who starts the workers: local processes unless the server was handed another launcher.
    launcher: WorkerLauncher = field(default_factory=LocalLauncher, compare=False)


class ModelGroup:
    """Worker processes holding one model's shards; `forward` runs one engine batch on them."""

    def __init__(self, config: GroupConfig, model_config: Any) -> None:
        if read_format(config.folder) is not None:
            raise ModelLoadError(
                f"{config.folder}: weights quantized ahead of time do not split over worker "
                "processes yet; serve the float checkpoint with generation.weights: int8 or bf16"
            )
        self.config = config
        self._values = model_config.to_dict()
        self.shape: LlamaShape = dataclasses.replace(
            shape_of(model_config), dtype=compute_dtype(config.weights)
        )
        self.plan: Plan = make_plan(dims_of(model_config), config.pipeline, config.tensor)
        for note in self.plan.notes:
            log.warning("%s: %s", config.folder, note)
        self.restarts = 0
        self.per_process: list[dict[str, Any]] = []  # weights / kv bytes and pid, by rank
        self._workers: WorkerGroup | None = None
        self._blocks: tuple[int, int] | None = None
        self._restarting: threading.Thread | None = None
        self._restart_error: str | None = None
        self._lock = threading.Lock()
        self._start()

    # --- the engine's side --------------------------------------------------------------

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """Each worker's KV pool: its layers and KV heads, `num_blocks` blocks (the driver's
        block tables index them all alike)."""
        self._blocks = (num_blocks, block_size)
        try:
            self._allocate()
        except WorkerLost as lost:
            self._stop_all()
            raise ModelLoadError(str(lost)) from None

    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """Logits (B, V), or (B, T, V) with `all_logits`, as model.forward's."""
        self._await_restart()
        if not self.healthy():  # died since the engine's check: this step's KV is gone too
            reason = self.dead_reason()
            self._lose(reason)
            raise Unavailable(f"a model-parallel worker failed ({reason}); retry shortly")
        fields = {"op": "forward", "micro": self._micro(batch), "all_logits": all_logits}
        tensors = {
            "tokens": batch.tokens,
            "positions": batch.positions,
            "slots": batch.slots,
            "block_tables": batch.block_tables,
            "last": batch.last,
        }
        last = self.plan.rank(self.plan.pipeline - 1, 0)
        try:
            [(_, out)] = self._call(encode(fields, tensors), [last])
        except WorkerLost as lost:
            self._lose(str(lost))
            raise Unavailable(
                f"a model-parallel worker failed ({lost}); the requests in flight failed and "
                "the worker group is restarting: retry shortly"
            ) from None
        return out["logits"]

    def healthy(self) -> bool:
        """Every worker is running (one that died is seen once its exit is reported)."""
        if self._restarting is not None:
            return True  # a new group is on its way
        return self._workers is not None and self._workers.alive()

    def dead_reason(self) -> str:
        return self._workers.dead_reason() if self._workers is not None else "stopped"

    def restart(self, reason: str) -> None:
        """Stop every worker and start a new group (the next forward waits for it)."""
        self._lose(reason)

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's forward seconds, seconds waiting on peers, and steps (benchmarks)."""
        self._await_restart()
        return [fields for fields, _ in self._call(encode({"op": "stats"}), self._ranks())]

    def nbytes(self) -> int:
        """The largest process's weights + KV: what each process's budget must hold."""
        return max((p["weights"] + p["kv"] for p in self.per_process), default=0)

    def close(self) -> None:
        if self._restarting is not None:
            self._restarting.join()
        self._stop_all()

    # --- processes ----------------------------------------------------------------------

    def _micro(self, batch: Batch) -> int:
        wanted = self.config.micro_batches or self.plan.pipeline
        return max(1, min(wanted, batch.tokens.shape[0]))

    def _ranks(self) -> list[int]:
        return list(range(self.plan.world))

    def _start(self) -> None:
        """Start every worker and wait until each has read its shard."""
        c = self.config
        specs = [
            WorkerSpec(str(c.folder), self._values, c.weights, c.pipeline, c.tensor, rank, "",
                       c.threads, c.budget_bytes, c.step_timeout_s)
            for rank in self._ranks()
        ]  # fmt: skip
        try:
            self._workers = c.launcher.start(specs, c.start_timeout_s)
        except WorkerLost as lost:
            raise ModelLoadError(f"model-parallel group failed to start: {lost}") from None

    def _allocate(self) -> None:
        if self._blocks is None:
            return
        num_blocks, block_size = self._blocks
        message = encode({"op": "allocate", "num_blocks": num_blocks, "block_size": block_size})
        self.per_process = [fields for fields, _ in self._call(message, self._ranks())]

    def _call(
        self, message: bytes, ranks: list[int], timeout_s: float | None = None
    ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """`message` to every worker; the decoded replies of `ranks` (WorkerLost otherwise)."""
        if self._workers is None:
            raise WorkerLost("no workers")
        self._workers.send(message)
        timeout = self.config.step_timeout_s if timeout_s is None else timeout_s
        return [decode(reply) for reply in self._workers.gather(ranks, timeout)]

    def _lose(self, reason: str) -> None:
        """Stop every worker; start a new group in the background (KV state is gone)."""
        log.error("model-parallel group lost: %s; restarting it", reason)
        self._stop_all()
        self.restarts += 1
        self._restart_error = None
        self._restarting = threading.Thread(
            target=self._restart, daemon=True, name="slimserve-mp-restart"
        )
        self._restarting.start()

    def _restart(self) -> None:
        try:
            self._start()
            self._allocate()
            log.info("model-parallel group restarted (%d workers)", self.plan.world)
        except (ModelLoadError, WorkerLost, OSError) as exc:
            self._stop_all()
            self._restart_error = str(exc)

    def _await_restart(self) -> None:
        if self._restarting is not None:
            self._restarting.join()
            self._restarting = None
        if self._restart_error is not None or self._workers is None:
            reason, self._restart_error = self._restart_error, None
            self._lose(reason or "no workers")  # try again, for the next request
            raise Unavailable(f"the model-parallel group could not restart ({reason}); retry")

    def _stop_all(self) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.stop()
