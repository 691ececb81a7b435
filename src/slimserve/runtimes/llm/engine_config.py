"""How the generation engine (engine.py) is configured, what it reports, and what a model
whose forward runs elsewhere must offer it. engine.py exports these names too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm.model import Batch, LlamaShape
from slimserve.runtimes.llm.speculate import SpeculativeConfig


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16  # token positions per KV block
    kv_cache_bytes: int = 256 * 2**20  # the KV pool's size (all layers, K and V; fp32 or bf16)
    max_seqs: int = 32  # sequences decoded together at most
    max_prefill_tokens: int = 2048  # prompt tokens computed per iteration at most
    # Iterations in a row that admit prompts without a decode step (scheduler.py); 0: every
    # iteration decodes the running sequences too.
    prefill_first: int = 4
    max_waiting: int = 256  # queued requests before submit refuses (RESOURCE_EXHAUSTED)
    continuous: bool = True  # False: static batching (admit only into an empty batch)
    prefix_caching: bool = True
    threads: int = 0  # torch intra-op threads in the engine thread; 0: usable_cores()
    speculative: SpeculativeConfig | None = None  # drafts for greedy requests (speculate.py)

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_seqs", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"EngineConfig.{name}={getattr(self, name)!r}; use >= 1")
        if self.prefill_first < 0:
            raise InvalidArgument(f"EngineConfig.prefill_first={self.prefill_first!r}; use >= 0")


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    free_blocks: int
    total_blocks: int
    preemptions: int
    cached_tokens: int  # prompt tokens served from the prefix cache since start
    iterations: int
    drafted_tokens: int  # speculative decoding: tokens proposed, and those the target kept
    accepted_tokens: int


class RemoteModel(Protocol):
    """A model whose forward runs elsewhere and holds its own KV pools (model-parallel worker
    processes: parallel/group.py). The engine's block tables index its pools as its own; a
    forward that raises Unavailable means that KV state is lost (see `_lose_kv`)."""

    shape: LlamaShape  # the whole model's

    def allocate(self, num_blocks: int, block_size: int) -> None: ...
    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor: ...
    def nbytes(self) -> int: ...
    def healthy(self) -> bool: ...
    def dead_reason(self) -> str: ...
    def restart(self, reason: str) -> None: ...


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's
    limit), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
