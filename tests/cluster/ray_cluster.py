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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
NODE_ARGS = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
RAY = str(Path(sys.executable).with_name("ray"))
METRICS_PORT = 8090  # the head node's Prometheus port; worker nodes the next ones
AGENT_PORT = 52365  # Ray's default agent HTTP port, the head node's; worker nodes the next


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
        for pid in [self.process.pid, *self.pids()]:  # ray start, raylet, workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pids(self) -> list[int]:
        """Every live process descending from this node's `ray start` (Ray's workers may
        start sessions of their own, so the process group alone misses them)."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    if fields[0] != "Z":
                        parents[int(entry.name)] = int(fields[1])
        mine = []
        for pid in parents:
            ancestor = pid
            while ancestor in parents and ancestor != self.process.pid:
                ancestor = parents[ancestor]
            if ancestor == self.process.pid:
                mine.append(pid)
        return mine

    def replica_pids(self) -> list[int]:
        return [p for p in self.pids() if "ServeReplica" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class RayCluster:
    """A head node and one worker node, `cpus` CPUs each (Ray's count, for placement), on
    127.0.0.1:`port`."""

    root: Path
    port: int
    env: dict[str, str]
    cpus: int = 1
    nodes: list[Node] = field(default_factory=list)
    added: int = 0  # worker nodes started so far (each gets ports of its own)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, workers: int = 1, timeout: float = 180) -> None:
        head = [RAY, "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
                "--metrics-export-port", str(METRICS_PORT)]  # fmt: skip
        self.nodes.append(self._spawn("head", [*head, *self._node_args()]))
        self.wait_started(timeout)
        for i in range(workers):
            self.add_worker(f"worker{i}")
            self.wait_started(timeout)

    def add_worker(self, name: str) -> Node:
        self.added += 1
        port = str(METRICS_PORT + self.added)  # each node exports Prometheus metrics
        # Each node's agent its own HTTP port (one address for every node here).
        agent = str(AGENT_PORT + self.added)
        cmd = [RAY, "start", "--address", self.address, "--metrics-export-port", port,
               "--dashboard-agent-listen-port", agent]  # fmt: skip
        node = self._spawn(name, [*cmd, *self._node_args()])
        self.nodes.append(node)
        return node

    def _node_args(self) -> list[str]:
        return [*NODE_ARGS, "--num-cpus", str(self.cpus)]

    def _spawn(self, name: str, cmd: list[str]) -> Node:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return Node(proc, log)

    def wait_started(self, timeout: float = 180) -> None:
        """Until every node says it started (`ray start` prints it once up). A worker node
        that gave up starting (Ray allows its raylet 30 s to register, which a loaded two-core
        machine can exceed) is started again, up to twice."""
        deadline, retried = time.monotonic() + timeout, Counter[Path]()
        while time.monotonic() < deadline:
            for i, node in enumerate(self.nodes):
                if node.process.poll() is not None:
                    if i == 0 or retried[node.log] >= 2:
                        raise RuntimeError(f"ray node exited:\n{node.log.read_text()[-3000:]}")
                    retried[node.log] += 1
                    node.signal(signal.SIGKILL)
                    self.nodes[i] = self._spawn(node.log.stem, node.process.args)  # type: ignore[arg-type]
            if all("Ray runtime started" in n.log.read_text() for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray nodes not up within {timeout} s")

    def kill_node(self, node: Node) -> None:
        """A node failure: SIGKILL to its `ray start`, raylet and workers at once."""
        node.signal(signal.SIGKILL)
        node.process.wait()
        self.nodes.remove(node)

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
