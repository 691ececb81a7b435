"""The one runtime interface: load, infer a batch, unload, memory used.

A runtime is the only place that touches a framework. It is built from a repository Target
(folder + model.yaml [+ variant.yaml]) and RuntimeOptions, and used from a worker thread: the
serving layer runs all of a unit's batches on the one thread assigned to it
(serving/threads.py), so `infer` is never called from two threads at once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from slimserve.repository.store import Target
from slimserve.runtimes.launch import WorkerLauncher
from slimserve.runtimes.llm.params import SamplingParams
from slimserve.types import Clock, TensorSpec, numpy_dtype

if TYPE_CHECKING:
    from slimserve.runtimes.llm.engine import EngineStats
    from slimserve.runtimes.llm.stream import GenerationStream


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Framework-level knobs, filled from Settings by the composition root."""

    intra_op_threads: int = 0  # 0: the framework's default (one per core)
    graph_optimization: str = "all"  # ONNX Runtime: disable | basic | extended | all
    spin_wait: bool = False  # idle intra-op threads spin (True) or sleep (False)
    # AES-256 key (32 bytes) for artifacts encrypted with `slimserve repo encrypt`; None: only
    # clear artifacts load. Kept out of repr so it never reaches a log line.
    data_key: bytes | None = field(default=None, repr=False)
    # The server's one clock (monotonic seconds), for runtimes that keep deadlines themselves
    # (the generation engine).
    clock: Clock = field(default=time.monotonic, repr=False, compare=False)
    # The server's memory budget (bytes, 0: unset): a model split over worker processes
    # checks each process's weights and KV cache against it (runtimes/llm/parallel/).
    memory_budget_bytes: int = 0
    # Who starts a split model's worker processes (runtimes/launch.py); None: local child
    # processes. On Ray, the replica hands in Ray actors in a placement group.
    launcher: WorkerLauncher | None = field(default=None, repr=False, compare=False)


class Runtime(ABC):
    """Runs one model version or variant. Inputs and outputs are dicts of numpy arrays.

    `infer` receives arrays already validated against `inputs` (names, datatypes, shapes);
    when the model is batched their first dimension is the batch, and every output must keep
    that first dimension.
    """

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        self.target = target
        self.options = options or RuntimeOptions()

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.target.config.input_specs()

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.target.config.output_specs()

    @abstractmethod
    def load(self) -> None:
        """Load the artifact (blocking). Raise ModelLoadError/UnsafeArtifact with a reason."""

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; return every declared output (the caller filters)."""

    @abstractmethod
    def unload(self) -> None:
        """Release the model and its memory; the runtime may be loaded again later."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this loaded model holds (weights and session buffers), best estimate."""

    def warmup(self) -> None:
        """Run once on zeros so the first real request pays no lazy initialisation."""
        feeds = {}
        for spec in self.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, b"warm up", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
        self.infer(feeds)


class TextGenerator(ABC):
    """What a language-model runtime adds to `Runtime`: prompts in, a stream of tokens out.

    The serving layer uses a text-generation unit only through these methods (the OpenAI
    routes and the v2 path alike); how the runtime batches and caches is its own business.
    """

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Tokens a prompt and its completion may hold together."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """A prompt's token ids."""

    @abstractmethod
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat messages rendered by the model's chat template, as token ids."""

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs)."""

    @abstractmethod
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, deadline_s: float | None
    ) -> GenerationStream:
        """Start generating (from the event loop); `deadline_s`: seconds from now, or None.
        Raises before any event for a refused request (bad parameters, too long, queue full)."""

    @abstractmethod
    def generation_stats(self) -> EngineStats:
        """Sequences, KV blocks and prefix-cache figures now (read at each metrics scrape)."""
