"""A real redis-server on a free loopback port, for tests of shared state."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Start redis-server (Debian package `redis-server`), yield its URL, stop it by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        why = "redis-server is not installed: apt-get install redis-server (make test does as root)"
        if os.environ.get("SLIMSERVE_REQUIRE_REDIS"):
            pytest.fail(why + "; SLIMSERVE_REQUIRE_REDIS is set (CI): Redis tests must run")
        pytest.skip(why)
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
