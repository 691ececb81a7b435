"""The default launcher: a group's workers as child processes of the server, one pipe each.

Not fork: it would copy the server's threads and locks. A fork server (a clean process started
once, with torch and the worker imported) forks each worker: a group starts, and restarts,
without paying the imports again per worker. The rendezvous is on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from slimserve.runtimes.launch import WorkerLost, WorkerSpec
from slimserve.runtimes.llm.parallel.wire import encode, header
from slimserve.runtimes.llm.parallel.worker import main


@dataclass(slots=True)
class _Process:
    process: BaseProcess
    conn: Connection
    rank: int


class LocalLauncher:
    """Starts workers as local processes (runtimes/launch.py's WorkerLauncher)."""

    def start(self, specs: Sequence[WorkerSpec], timeout_s: float) -> LocalWorkers:
        context = get_context("forkserver")
        context.set_forkserver_preload([main.__module__])
        address = f"tcp://127.0.0.1:{_free_port()}"
        procs = []
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=main,
                args=(dataclasses.replace(spec, address=address), theirs),
                daemon=True,
                name=f"slimserve-mp-{spec.rank}",
            )
            process.start()
            theirs.close()
            procs.append(_Process(process, ours, spec.rank))
        workers = LocalWorkers(procs)
        try:
            workers.gather([p.rank for p in procs], timeout_s)  # each one's "loaded"
        except WorkerLost:
            workers.stop()
            raise
        return workers


class LocalWorkers:
    """Started local workers (runtimes/launch.py's WorkerGroup)."""

    def __init__(self, procs: list[_Process]) -> None:
        self._procs = procs

    def send(self, message: bytes) -> None:
        try:
            for proc in self._procs:
                proc.conn.send_bytes(message)
        except OSError as exc:
            raise WorkerLost(str(exc)) from None

    def gather(self, ranks: Sequence[int], timeout_s: float) -> list[bytes]:
        """Messages first: an error a worker reported explains its death."""
        deadline = time.monotonic() + timeout_s
        got: dict[int, bytes] = {}
        waiting = set(ranks)
        while waiting:
            ready = wait(
                [p.conn for p in self._procs] + [p.process.sentinel for p in self._procs],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                raise WorkerLost(f"rank {min(waiting)} did not answer within {timeout_s:g} s")
            for proc in self._procs:
                if proc.conn in ready:
                    message = _read(proc)
                    fields = header(message)
                    if fields["op"] == "error" or proc.rank not in waiting:
                        raise WorkerLost(str(fields.get("message", fields)))
                    got[proc.rank] = message
                    waiting.discard(proc.rank)
            dead = [p for p in self._procs if p.process.sentinel in ready and p.conn not in ready]
            if dead:
                raise WorkerLost(_exit_of(dead[0]))
        return [got[r] for r in ranks]

    def alive(self) -> bool:
        return bool(self._procs) and all(p.process.is_alive() for p in self._procs)

    def dead_reason(self) -> str:
        return next((_exit_of(p) for p in self._procs if not p.process.is_alive()), "stopped")

    def pids(self) -> list[int]:
        return [p.process.pid or 0 for p in self._procs]

    def stop(self) -> None:
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


def _read(proc: _Process) -> bytes:
    try:
        return proc.conn.recv_bytes()
    except (EOFError, OSError):
        raise WorkerLost(_exit_of(proc)) from None


def _exit_of(proc: _Process) -> str:
    proc.process.join(timeout=1.0)
    code = proc.process.exitcode
    return f"worker rank {proc.rank} (pid {proc.process.pid}) exited with code {code}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
