"""A model-parallel group on Ray: its workers as actors, gang-scheduled in a placement group.

When slimserve serves on Ray, a model whose model.yaml asks for pipeline_parallel x
tensor_parallel > 1 gets its worker processes here (the replica hands this launcher to the
composition root) rather than as child processes of the replica:

- One bundle of --ray-group-cpus CPUs per worker, in one placement group with the strategy
  --ray-group-strategy (PACK: as few nodes as hold it; SPREAD: over nodes where it can;
  STRICT_PACK: one node; STRICT_SPREAD: a node per worker). Ray reserves every bundle at once
  or none, so a group never half-starts and holds CPUs while waiting for the rest.
- Rank 0's actor names the rendezvous on its own node (its node address, a free port there);
  torch.distributed (gloo) joins over the nodes' addresses, so a group may span nodes. Gloo is
  bound to the interface holding the node's address (GLOO_SOCKET_IFNAME, unless set).
- Each message to the workers is one actor call carrying the same bytes as the local pipes
  (runtimes/llm/parallel/wire.py), to the same worker code (worker.py). A `watch` call per
  actor stays pending for the actor's life: once it completes, the actor is gone, which the
  driver sees between steps without waiting.
- A group that fails (an actor died, reported an error, or a step timed out) is stopped: its
  actors are killed and its placement group removed; the driver (group.py) starts a new one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import psutil
import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slimserve.runtimes.launch import WorkerLost, WorkerSpec

log = logging.getLogger("slimserve.ray")

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@ray.remote(concurrency_groups={"watch": 1}, max_restarts=0)  # type: ignore[call-overload]
class GroupWorker:
    """One rank of a model-parallel group (runtimes/llm/parallel/worker.py) as a Ray actor.
    Its calls other than `watch` run one at a time, in the order they were made."""

    def __init__(self) -> None:
        self.worker: Any = None  # runtimes/llm/parallel/worker.py's Worker, once started

    def place(self) -> dict[str, Any]:
        """Where this actor runs: its node's address and id, and its process id."""
        context = ray.get_runtime_context()
        return {"ip": ray.util.get_node_ip_address(), "node": context.get_node_id(),
                "pid": os.getpid()}  # fmt: skip

    def rendezvous(self) -> str:
        """tcp://NODE_IP:PORT, a port free on this node now (rank 0 listens on it)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((ip, 0))
            return f"tcp://{ip}:{sock.getsockname()[1]}"

    def start(self, spec: dict[str, Any]) -> bytes:
        """Join the group and read the shard; the "loaded" reply. An exception here or in
        `call` reaches the driver as this call's error (RayTaskError), naming the stage."""
        # torch, in this actor's process only: the replica loads it once a split model loads.
        from slimserve.runtimes.llm.parallel.worker import Worker

        worker_spec = WorkerSpec(**spec)
        _bind_gloo(ray.util.get_node_ip_address())
        try:
            self.worker = Worker(worker_spec)
        except Exception as exc:  # noqa: BLE001 - reraised for the driver, naming the stage
            raise RuntimeError(worker_spec.failure(exc)) from None
        reply: bytes = self.worker.loaded()
        return reply

    def call(self, message: bytes) -> bytes:
        """One message's reply (b"": none due)."""
        if self.worker is None:
            raise RuntimeError("a message before start")
        try:
            reply: bytes | None = self.worker.handle_bytes(message)
        except Exception as exc:  # noqa: BLE001 - reraised for the driver, naming the stage
            raise RuntimeError(self.worker.spec.failure(exc)) from None
        return reply or b""

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never returns while the actor lives (see the module docstring)."""
        threading.Event().wait()


def _bind_gloo(ip: str) -> None:
    """Gloo on the interface that holds this node's Ray address (it would otherwise use the
    address the host name resolves to, which may not be the one the nodes reach each other on)."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


class RayLauncher:
    """Starts a group's workers as actors in a placement group (runtimes/launch.py)."""

    def __init__(self, strategy: Strategy = "PACK", cpus: float = 1.0) -> None:
        self.strategy, self.cpus = strategy, cpus

    def start(self, specs: Sequence[WorkerSpec], timeout_s: float) -> RayWorkers:
        group = placement_group([{"CPU": self.cpus}] * len(specs), strategy=self.strategy)
        workers = RayWorkers(group, [])
        try:
            self._place(group, len(specs), timeout_s)
            actors = [
                GroupWorker.options(  # type: ignore[attr-defined]
                    num_cpus=self.cpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=rank
                    ),
                ).remote()
                for rank in range(len(specs))
            ]
            workers = RayWorkers(group, actors)
            address = ray.get(actors[0].rendezvous.remote(), timeout=timeout_s)
            workers.calls = [
                a.start.remote(dataclasses.asdict(dataclasses.replace(s, address=address)))
                for a, s in zip(actors, specs, strict=True)
            ]
            workers.gather(range(len(specs)), timeout_s)  # each one's "loaded"
            workers.places = ray.get([a.place.remote() for a in actors], timeout=timeout_s)
        except (WorkerLost, RayError) as exc:
            workers.stop()
            raise WorkerLost(f"on Ray: {exc}") from None
        log.info(
            "model-parallel group placed (%s): %s", self.strategy,
            ", ".join(f"rank {r} on {p['ip']} node {p['node'][:8]} pid {p['pid']}"
                      for r, p in enumerate(workers.places)),
        )  # fmt: skip
        return workers

    def _place(self, group: PlacementGroup, count: int, timeout_s: float) -> None:
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except GetTimeoutError:
            raise WorkerLost(
                f"Ray could not place {count} workers of {self.cpus:g} CPU each "
                f"({self.strategy}) within {timeout_s:g} s; the cluster has "
                f"{ray.available_resources().get('CPU', 0):g} CPUs free: add nodes, lower "
                "--ray-group-cpus, or choose a looser --ray-group-strategy"
            ) from None


class RayWorkers:
    """A started group of actors (runtimes/launch.py's WorkerGroup)."""

    def __init__(self, group: PlacementGroup, actors: list[Any]) -> None:
        self.group, self.actors = group, actors
        self.watch = [a.watch.remote() for a in actors]
        self.calls: list[Any] = []  # the last message's call on each rank, by rank
        self.places: list[dict[str, Any]] = []

    def send(self, message: bytes) -> None:
        self.calls = [a.call.remote(message) for a in self.actors]

    def gather(self, ranks: Sequence[int], timeout_s: float) -> list[bytes]:
        """Every rank's call is awaited (a failure anywhere fails the step at once); the
        replies of `ranks` are returned."""
        deadline = time.monotonic() + timeout_s
        rank_of = {ref: rank for rank, ref in enumerate(self.calls)}
        pending, got = list(self.calls), dict[int, bytes]()
        while pending:
            ready, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = min(rank_of[r] for r in pending)
                raise WorkerLost(f"rank {late} did not answer within {timeout_s:g} s")
            for ref in ready:
                got[rank_of[ref]] = self._reply(rank_of[ref], ref)
        missing = [r for r in ranks if not got.get(r)]
        if missing:
            raise WorkerLost(f"rank {missing[0]} sent no reply")
        return [got[r] for r in ranks]

    def _reply(self, rank: int, ref: Any) -> bytes:
        try:
            reply: bytes = ray.get(ref)
        except RayTaskError as exc:  # the worker raised: its own message
            raise WorkerLost(str(getattr(exc, "cause", None) or _first_line(exc))) from None
        except RayError as exc:  # the actor (its process, its node) is gone
            where = self._where(rank)
            raise WorkerLost(f"worker rank {rank}{where} died: {_first_line(exc)}") from None
        return reply

    def _where(self, rank: int) -> str:
        if rank >= len(self.places):
            return ""
        place = self.places[rank]
        return f" (pid {place['pid']} on {place['ip']})"

    def alive(self) -> bool:
        ready, _ = ray.wait(self.watch, timeout=0)
        return bool(self.actors) and not ready

    def dead_reason(self) -> str:
        ready, _ = ray.wait(self.watch, timeout=0)
        if not ready:
            return "stopped"
        rank = self.watch.index(ready[0])
        return f"worker rank {rank}{self._where(rank)} exited"

    def pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.places]

    def stop(self) -> None:
        actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
