"""A `slimserve serve` child process on free loopback ports, for measuring a configuration.

Used by `slimserve profile` (one server per batching configuration of the sweep), the demo,
the end-to-end tests and the benchmarks: the server is the real one, in its own process, so the
load generator in this process does not share its event loop. Readiness is polled (the
readiness endpoint, every 0.1 s) up to a deadline, never waited for a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
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
        return log_tail(self.log_path, lines)

    def peak_rss_bytes(self) -> int | None:
        """The server process's peak resident memory (VmHWM), where /proc has it."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


def serve_command(repository: Path, http_port: int, grpc_port: int, *flags: str) -> list[str]:
    """`python -m slimserve serve` on `repository` and the given ports (gRPC 0: off)."""
    return [
        sys.executable,
        "-m",
        "slimserve",
        "serve",
        "--repository",
        str(repository),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *flags,
    ]


def spawn(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` with its output (stdout and stderr) in `log_path`; `env` adds to ours."""
    with log_path.open("wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def log_tail(log_path: Path, lines: int = 30) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    log_path: Path,
    timeout_s: float = READY_TIMEOUT_S,
    *,
    ssl_context: ssl.SSLContext | None = None,
    started: float | None = None,
) -> float:
    """Poll `url` (a readiness endpoint) until it answers 200; the seconds since `started`
    (a time.monotonic() reading; default: now). Raises Unavailable, with the log's tail, if
    the process exits first or `timeout_s` after `started` passes."""
    started = time.monotonic() if started is None else started
    while time.monotonic() < started + timeout_s:
        if process.poll() is not None:
            raise Unavailable(f"the server exited with {process.returncode}:\n{log_tail(log_path)}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2, context=ssl_context) as resp,
        ):
            if resp.status == 200:
                return time.monotonic() - started
        time.sleep(0.1)
    raise Unavailable(
        f"the server was not ready after {timeout_s:.0f} s ({url}):\n{log_tail(log_path)}"
    )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int | None:
    """SIGTERM (a graceful shutdown), SIGKILL if it has not exited within `timeout_s`; the
    exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def local_server(
    repository: Path,
    *flags: str,
    grpc: bool = False,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[LocalServer]:
    """Start `slimserve serve` on `repository`; stop it by its PID on the way out."""
    http_port, grpc_port = free_ports(2)
    grpc_port = grpc_port if grpc else 0
    cmd = serve_command(repository, http_port, grpc_port, "--log-format", "text", *flags)
    with tempfile.TemporaryDirectory(prefix="slimserve-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        proc = spawn(cmd, log_path, env)
        try:
            url = f"http://127.0.0.1:{http_port}/v2/health/ready"
            wait_ready(proc, url, log_path, ready_timeout_s)
            yield LocalServer(proc, http_port, grpc_port, log_path)
        finally:
            stop(proc)
