"""`python -m slimserve.demo --quick`, end to end: it builds a repository, starts the real
server, queries it with tritonclient (HTTP and gRPC), curl and the openai client, and stops the
server."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _run_demo(repo, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "slimserve.demo",
            "--quick",
            "--no-install",
            "--images",
            "6",
            "--repository",
            str(repo),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _predictions(text: str, title: str) -> list[tuple[str, str]]:
    block = text.split(title, 1)[1].split("right", 1)[0]
    return re.findall(r"label (.+?)\s+predicted (.+?)\s+(?:ok|WRONG)", block)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    repo = tmp_path_factory.mktemp("demo") / "demo-repo"
    done = _run_demo(repo)
    return repo, done


def test_demo_serves_real_requests_and_stops_the_server(demo_run):
    repo, done = demo_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout

    # the repository it built is a valid slimserve repository
    listed = subprocess.run(
        [sys.executable, "-m", "slimserve", "repo", "list", "-r", str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert re.search(r"fashion-mlp\s+1\s+-\s+onnx\s+.*ok", listed.stdout), listed.stdout
    assert re.search(r"minilm\s+1\s+-\s+transformers\s+.*ok", listed.stdout), listed.stdout

    http = _predictions(out, "tritonclient.http -> fashion-mlp")
    grpc = _predictions(out, "tritonclient.grpc -> fashion-mlp")
    assert len(http) == 6 and http == grpc  # same images, same model, same answers
    right = sum(label == pred for label, pred in http)
    assert right >= 3, out  # a trained model, far above chance (10%)

    sims = [float(x) for x in re.findall(r"cosine similarity (-?[0-9.]+):", out)]
    assert len(sims) == 2
    assert sims[0] > sims[1]  # the paraphrase is closer than the unrelated sentence

    # SmolLM2 converted from its GGUF file, served, and asked through the openai client
    assert re.search(r"smollm2\s+1\s+-\s+transformers\s+.*ok", listed.stdout), listed.stdout
    answer = out.split("user: What is the capital of France?", 1)[1].split("user:", 1)[0]
    assert "Paris" in answer, out[-2000:]
    streamed = int(re.search(r"\((\d+) streamed chunks\)", out).group(1))
    assert streamed >= 5, out[-2000:]  # the answer came as many events, not one

    pid = int(re.search(r"server stopped \(pid (\d+)\)", out).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_second_run_keeps_the_repository(demo_run):
    repo, first = demo_run
    assert first.returncode == 0
    done = _run_demo(repo, "--build-only")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kept = [f"{name}: exists, kept" for name in ("fashion-mlp", "minilm", "smollm2")]
    assert all(line in done.stdout for line in kept), done.stdout
    assert "converting" not in done.stdout
    assert "training" not in done.stdout and "server ready" not in done.stdout
    assert sorted(p.name for p in (repo / "fashion-mlp").iterdir()) == ["1", "model.yaml"]
