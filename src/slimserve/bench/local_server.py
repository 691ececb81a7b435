"""A `slimserve serve` child process on free loopback ports, for measuring a configuration.

Used by `slimserve profile` (one server per batching configuration of the sweep) and by the
benchmarks that run a plan: the server is the real one, in its own process, so the load
generator in this process does not share its event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import Unavailable

READY_TIMEOUT_S = 120.0


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all bound at once, so no two are the same."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass(frozen=True)
class LocalServer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def peak_rss_bytes(self) -> int | None:
        """The server process's peak resident memory (VmHWM), where /proc has it."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


@contextlib.contextmanager
def local_server(
    repository: Path, *flags: str, grpc: bool = False, env: dict[str, str] | None = None
) -> Iterator[LocalServer]:
    """Start `slimserve serve` on `repository`; stop it by its PID on the way out."""
    http_port, grpc_port = free_ports(2)
    cmd = [
        sys.executable,
        "-m",
        "slimserve",
        "serve",
        "--repository",
        str(repository),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port if grpc else 0),
        "--log-format",
        "text",
        *flags,
    ]
    with tempfile.TemporaryDirectory(prefix="slimserve-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        server = LocalServer(proc, http_port, grpc_port if grpc else 0, log_path)
        try:
            _wait_ready(server)
            yield server
        finally:
            _stop(proc)


def _wait_ready(server: LocalServer) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v2/health/ready"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise Unavailable(
                f"the server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise Unavailable(f"the server was not ready after {READY_TIMEOUT_S:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
