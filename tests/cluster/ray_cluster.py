"""A real two-node Ray cluster on this machine, for the Ray tests and benchmarks.

Ray advertises the host's address and listens on every interface, so the nodes run inside a
private network namespace holding only loopback: the calling thread enters a new namespace
(`unshare(CLONE_NEWNET)`, root), brings `lo` up, and every process and thread it starts from
then on lives there; `leave()` returns the thread to the machine's namespace. Each node is
`ray start --block` in its own process group, stopped (or killed, to test a node failure)
by that group's id: never `ray stop`, which kills Ray processes by name machine-wide.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
NODE_ARGS = [
    "--block",
    "--num-cpus",
    "1",
    "--node-ip-address",
    "127.0.0.1",
    "--disable-usage-stats",
]
RAY = str(Path(sys.executable).with_name("ray"))


class PrivateNetwork:
    """The calling thread in a fresh network namespace with loopback only, until leave()."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self._libc.unshare(CLONE_NEWNET) != 0:
            os.close(self._home)
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed (needs root)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def leave(self) -> None:
        if self._libc.setns(self._home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the machine's network failed")
        os.close(self._home)


def can_unshare() -> bool:
    return os.geteuid() == 0 and Path("/proc/thread-self/ns/net").exists()


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    log: Path

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # the node's group: ray start, raylet, workers

    def pids(self) -> list[int]:
        """Every live process of this node's group."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        out.append(int(entry.name))
                except ProcessLookupError:
                    continue
        return out

    def replica_pids(self) -> list[int]:
        return [p for p in self.pids() if _cmdline(p).startswith("ray::ServeReplica")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class RayCluster:
    """A head node and one worker node, one CPU each, on 127.0.0.1:`port`."""

    root: Path
    port: int
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, workers: int = 1, timeout: float = 120) -> None:
        head = [RAY, "start", "--head", "--port", str(self.port), "--include-dashboard", "false"]
        self.nodes.append(self._spawn("head", [*head, *NODE_ARGS]))
        for i in range(workers):  # at once: a worker waits for the head's GCS by itself
            self.add_worker(f"worker{i}")
        self.wait_started(timeout)

    def add_worker(self, name: str) -> Node:
        node = self._spawn(name, [RAY, "start", "--address", self.address, *NODE_ARGS])
        self.nodes.append(node)
        return node

    def _spawn(self, name: str, cmd: list[str]) -> Node:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return Node(proc, log)

    def wait_started(self, timeout: float = 120) -> None:
        """Until every node says it started (`ray start` prints it once up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray node exited:\n{node.log.read_text()[-3000:]}")
            if all("Ray runtime started" in n.log.read_text() for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray nodes not up within {timeout} s")

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM each node's group, SIGKILL what is left after `grace_s` (test clusters
        hold nothing worth a slow shutdown)."""
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.1, deadline - time.monotonic()))
            node.signal(signal.SIGKILL)
            node.process.wait()
