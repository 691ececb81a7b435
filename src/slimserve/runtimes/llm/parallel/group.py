"""The driver's side of model-parallel generation: P x T worker processes, one forward a call.

    group = ModelGroup(GroupConfig(folder, "fp32", pipeline=2, tensor=1))   # spawns, loads
    engine = GenerationEngine(group, tokenizer, EngineConfig(...))          # allocates KV
    ... engine.step() calls group.forward(batch, all_logits) -> logits (B, V)

The engine's scheduler, block tables and prefix cache stay here; each step the same batch
metadata goes to every worker (pipe, wire.py) and the last stage's rank 0 answers the logits.
A worker that dies, reports an error or does not answer within `step_timeout_s` fails the
step with UNAVAILABLE (503) naming it; every worker is then stopped and a new group starts
in the background (the next forward waits for it), so the model serves again: no hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import ModelLoadError, Unavailable
from slimserve.runtimes.llm.model import Batch, LlamaShape, compute_dtype, shape_of
from slimserve.runtimes.llm.parallel.plan import Plan, make_plan
from slimserve.runtimes.llm.parallel.shard import dims_of
from slimserve.runtimes.llm.parallel.wire import decode, encode
from slimserve.runtimes.llm.parallel.worker import WorkerSpec, main
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


class _Lost(Exception):
    """A worker died, failed or stopped answering."""


@dataclass(slots=True)
class _Process:
    process: BaseProcess
    conn: Connection
    rank: int


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
        self._procs: list[_Process] = []
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
        except _Lost as lost:
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
        message = encode(fields, tensors)
        try:
            for proc in self._procs:
                proc.conn.send_bytes(message)
            [(_, out)] = self._gather([self._procs[self.plan.rank(self.plan.pipeline - 1, 0)]])
        except (_Lost, OSError) as lost:
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
        return bool(self._procs) and all(p.process.is_alive() for p in self._procs)

    def dead_reason(self) -> str:
        return next((_exit_of(p) for p in self._procs if not p.process.is_alive()), "stopped")

    def restart(self, reason: str) -> None:
        """Stop every worker and start a new group (the next forward waits for it)."""
        self._lose(reason)

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's forward seconds, seconds waiting on peers, and steps (benchmarks)."""
        self._await_restart()
        for proc in self._procs:
            proc.conn.send_bytes(encode({"op": "stats"}))
        return [fields for fields, _ in self._gather(self._procs)]

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

    def _start(self) -> None:
        """Spawn every worker and wait until each has read its shard."""
        # Not fork: it would copy the server's threads and locks. A fork server (a clean
        # process started once, with torch and the worker imported) forks each worker: a group
        # starts, and restarts, without paying the imports again per worker.
        context = get_context("forkserver")
        context.set_forkserver_preload([main.__module__])
        address = f"tcp://127.0.0.1:{_free_port()}"
        c = self.config
        procs = []
        for rank in range(self.plan.world):
            spec = WorkerSpec(
                str(c.folder),
                self._values,
                c.weights,
                c.pipeline,
                c.tensor,
                rank,
                address,
                c.threads,
                c.budget_bytes,
                c.step_timeout_s,
            )
            ours, theirs = context.Pipe()
            process = context.Process(
                target=main, args=(spec, theirs), daemon=True, name=f"slimserve-mp-{rank}"
            )
            process.start()
            theirs.close()
            procs.append(_Process(process, ours, rank))
        self._procs = procs
        try:
            self._gather(procs, c.start_timeout_s)
        except _Lost as lost:
            self._stop_all()
            raise ModelLoadError(f"model-parallel group failed to start: {lost}") from None

    def _allocate(self) -> None:
        if self._blocks is None:
            return
        num_blocks, block_size = self._blocks
        message = encode({"op": "allocate", "num_blocks": num_blocks, "block_size": block_size})
        for proc in self._procs:
            proc.conn.send_bytes(message)
        self.per_process = [fields for fields, _ in self._gather(self._procs)]

    def _gather(
        self, expect: list[_Process], timeout_s: float | None = None
    ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """The next message of each of `expect`, in its order; _Lost if any worker dies,
        reports an error, says anything unexpected, or the answers take over the timeout."""
        timeout = self.config.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
        waiting = {p.rank for p in expect}
        while waiting:
            conns = [p.conn for p in self._procs]
            ready = wait(
                conns + [p.process.sentinel for p in self._procs],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                raise _Lost(f"rank {min(waiting)} did not answer within {timeout:g} s")
            for proc in self._procs:  # messages first: an error explains a death
                if proc.conn in ready:
                    fields, tensors = _read(proc)
                    if fields["op"] == "error" or proc.rank not in waiting:
                        raise _Lost(str(fields.get("message", fields)))
                    got[proc.rank] = (fields, tensors)
                    waiting.discard(proc.rank)
            dead = [p for p in self._procs if p.process.sentinel in ready and p.conn not in ready]
            if dead:
                raise _Lost(_exit_of(dead[0]))
        return [got[p.rank] for p in expect]

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
        except (ModelLoadError, _Lost, OSError) as exc:
            self._stop_all()
            self._restart_error = str(exc)

    def _await_restart(self) -> None:
        if self._restarting is not None:
            self._restarting.join()
            self._restarting = None
        if self._restart_error is not None or not self._procs:
            reason, self._restart_error = self._restart_error, None
            self._lose(reason or "no workers")  # try again, for the next request
            raise Unavailable(f"the model-parallel group could not restart ({reason}); retry")

    def _stop_all(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.conn.send_bytes(encode({"op": "stop"}))
        for proc in procs:
            proc.process.join(timeout=2.0)
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join(timeout=5.0)
            proc.conn.close()


def _read(proc: _Process) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        return decode(proc.conn.recv_bytes())
    except (EOFError, OSError):
        raise _Lost(_exit_of(proc)) from None


def _exit_of(proc: _Process) -> str:
    proc.process.join(timeout=1.0)
    code = proc.process.exitcode
    return f"worker rank {proc.rank} (pid {proc.process.pid}) exited with code {code}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
