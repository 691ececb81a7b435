"""`slimserve serve --workers 2`: two processes share the HTTP and gRPC ports and stop together."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conftest import Repo, mlp_reference, start_server, stop_server


def test_two_workers_serve_both_protocols_and_stop_cleanly(model_repo: Repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(model_repo.root, root)
    server = start_server(root, tmp_path / "server.log", "--workers", "2", "--log-format", "text")
    try:
        x = np.ones((2, 4), np.float32)
        expected = mlp_reference(model_repo.weights["mlp/2"], x)
        for _ in range(20):  # new connections each time: the kernel spreads them over workers
            http = httpclient.InferenceServerClient(server.http_url)
            inp = httpclient.InferInput("input", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            out = http.infer("mlp", [inp]).as_numpy("logits")
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
            http.close()
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        ginp = grpcclient.InferInput("input", [2, 4], "FP32")
        ginp.set_data_from_numpy(x)
        np.testing.assert_allclose(
            grpc.infer("mlp", [ginp]).as_numpy("logits"), expected, rtol=1e-5, atol=1e-5
        )
        # Each worker logs its start; on a loaded machine the second may still be starting
        # when the first already answers (readiness is per worker), so wait for both.
        deadline = time.monotonic() + 60
        while True:
            workers = set(re.findall(r"Started server process \[(\d+)\]", server.log()))
            if len(workers) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(workers) == 2, server.log()[-3000:]
    finally:
        stop_server(server)
    assert server.process.returncode == 0
    alive = [pid for pid in workers if subprocess.run(["kill", "-0", pid]).returncode == 0]
    assert alive == []


def test_model_control_with_several_workers_is_refused_with_a_reason(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimserve",
            "serve",
            "--repository",
            str(tmp_path),
            "--workers",
            "2",
            "--model-control",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "workers: 1" in out.stderr and "model_control" in out.stderr
