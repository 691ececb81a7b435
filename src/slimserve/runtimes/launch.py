"""Where a model split over worker processes gets its processes: the launcher seam.

A model-parallel group (runtimes/llm/parallel/group.py) needs P x T worker processes joined in
one torch.distributed group. Who starts them depends on where the server runs:

- by itself (`slimserve serve`): child processes of the server on this machine
  (runtimes/llm/parallel/local.py, the default);
- on Ray (`slimserve serve --ray ...`): Ray actors gang-scheduled in a placement group, which
  may span nodes (cluster/ray_group.py, handed in by the Ray replica through the composition
  root).

Both speak the same messages (runtimes/llm/parallel/wire.py: a JSON header and raw tensor
bytes) to workers running the same code (runtimes/llm/parallel/worker.py). No torch here:
RuntimeOptions carries a launcher, and importing slimserve loads no framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker is started with (plain values: it crosses the process boundary)."""

    folder: str
    config: dict[str, Any]  # the transformers config's to_dict(): no transformers import there
    weights: str
    pipeline: int
    tensor: int
    rank: int
    address: str  # tcp://HOST:PORT of the rendezvous ("": the launcher picks it)
    threads: int  # torch intra-op threads
    budget_bytes: int  # weights + KV this process may hold (0: unchecked)
    timeout_s: float  # collectives fail after this long (a peer gone)

    def failure(self, exc: BaseException) -> str:
        """What the driver is told of this worker's exception."""
        stage, tp = divmod(self.rank, self.tensor)
        return f"stage {stage} rank {tp}: {exc}"


class WorkerLost(Exception):
    """A worker died, failed, said something unexpected or stopped answering."""


class WorkerGroup(Protocol):
    """Started workers, every one loaded, addressed by rank."""

    def send(self, message: bytes) -> None:
        """The same message to every rank, in rank order."""

    def gather(self, ranks: Sequence[int], timeout_s: float) -> list[bytes]:
        """The reply of each of `ranks` to the last message, in that order; WorkerLost when
        any worker dies, reports an error or the replies take over `timeout_s`."""

    def alive(self) -> bool:
        """Every worker is still running, as far as is known without waiting."""

    def dead_reason(self) -> str:
        """Which worker is gone and how (for the 503 and the log)."""

    def pids(self) -> list[int]:
        """Each rank's process id (on its own node)."""

    def stop(self) -> None:
        """Stop every worker (and free what was reserved for them)."""


class WorkerLauncher(Protocol):
    """Starts one group's workers; called again for each restart."""

    def start(self, specs: Sequence[WorkerSpec], timeout_s: float) -> WorkerGroup:
        """Workers started from `specs` (rank order, `address` filled in by the launcher),
        each having read its shard; WorkerLost (all stopped) otherwise."""
