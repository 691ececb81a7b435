"""`--workers N` under load: a killed worker is replaced while the others serve, SIGHUP reloads
them one at a time with no failed request, and a crash loop stops the server saying why."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimserve.demo.clients import free_ports
from tests.cluster.load import Load
from tests.e2e.conftest import Repo, ServerProcess, start_server, stop_server


def worker_pids(server: ServerProcess) -> set[int]:
    """Workers alive now: those the supervisor started or restarted and that still run."""
    log = server.log()
    pids = {int(p) for line in re.findall(r"started \d+ workers: ([\d, ]+)", log)
            for p in line.split(", ")}  # fmt: skip
    pids |= {int(p) for p in re.findall(r"restarted as pid (\d+)", log)}
    pids |= {int(p) for p in re.findall(r"reloaded: pid (\d+)", log)}
    return {p for p in pids if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie is dead, only not yet reaped


def wait_until(check, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def workers(model_repo: Repo, tmp_path: Path):
    root = tmp_path / "models"
    shutil.copytree(model_repo.root, root)
    server = start_server(
        root, tmp_path / "server.log", "--workers", "2", "--log-format", "text",
        "--load-models", "mlp",
    )  # fmt: skip
    try:
        assert wait_until(lambda: len(worker_pids(server)) == 2), server.log()[-3000:]
        assert wait_until(lambda: server.log().count("Started server process") >= 2)
        yield server
    finally:
        stop_server(server)


def test_a_killed_worker_is_replaced_while_the_other_serves(workers: ServerProcess):
    url = f"http://{workers.http_url}/v2/models/mlp/infer"
    victim = min(worker_pids(workers))
    with Load(url, threads=4) as load:
        load.wait_for(200)
        os.kill(victim, signal.SIGKILL)
        before = load.total()
        load.wait_for(300)
        replaced = wait_until(lambda: len(worker_pids(workers) - {victim}) == 2)
        load.wait_for(200)  # and the replacement takes its share
    log = workers.log()
    assert replaced, log[-3000:]
    assert f"(pid {victim}) exited with -9; the others keep serving" in log
    # Only requests in flight on the dead worker's connections can fail: at most one per
    # client thread. Everything sent after the kill to the shared socket is served.
    failed = sum(load.errors.values())
    print(f"kill -9 under load: {failed} failed of {load.total()} ({dict(load.errors)})")
    assert failed <= load.threads, (load.errors, log[-3000:])
    assert load.total() - before >= 300 and workers.alive()


def test_sighup_reloads_every_worker_with_no_failed_request(workers: ServerProcess):
    url = f"http://{workers.http_url}/v2/models/mlp/infer"
    old = worker_pids(workers)
    with Load(url, threads=4) as load:
        load.wait_for(200)
        workers.process.send_signal(signal.SIGHUP)
        done = wait_until(lambda: "reload done" in workers.log(), timeout=120)
        load.wait_for(200)
    assert done, workers.log()[-3000:]
    new = worker_pids(workers)
    assert len(new) == 2 and not new & old, (old, new)
    # An old worker drains: it stops accepting, answers what its keep-alive connections send
    # next with `Connection: close`, and only then closes them (transport/http_protocol.py),
    # so no request is lost to a close racing a client's next request.
    print(f"SIGHUP reload under load: {dict(load.errors)} failed of {load.total()}")
    assert not load.errors, load.errors
    assert load.ok > 400


def test_a_crash_loop_stops_the_server_and_says_why(model_repo: Repo, tmp_path: Path):
    http_port, grpc_port = free_ports(2)
    taken = socket.socket()  # every worker fails to bind gRPC: each restart dies again
    taken.bind(("127.0.0.1", grpc_port))
    taken.listen()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "slimserve", "serve", "--repository", str(model_repo.root),
             "--load-models", "", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--workers", "2", "--worker-max-restarts", "1", "--log-format", "text"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        taken.close()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "died 2 times within 60 s" in out.stderr and "crash loop" in out.stderr
    assert "restart 1 in 0.5 s" in out.stderr
