"""A model split in two pipeline stages, served on a real two-node Ray cluster (private network
namespace, loopback only): its workers are Ray actors gang-scheduled in a placement group
(STRICT_SPREAD: one stage per node), joined by torch.distributed over the nodes' addresses.
Greedy answers equal the one-process engine's; a stage actor killed mid-generation fails the
requests in flight with 503 (the stream with the same error), the group is placed again and
the model answers as before.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.app import build_server
from slimserve.config import Settings
from tests.cluster.ray_cluster import Node, PrivateNetwork, RayCluster, _cmdline, can_unshare
from tests.cluster.test_ray import HTTP, SRC, Deployment
from tests.transport.test_openai import LM_YAML

pytestmark = [
    pytest.mark.skipif(not can_unshare(), reason="needs root for a private network namespace"),
    pytest.mark.timeout(900),
]

WHOLE = LM_YAML.replace("max_seqs: 8}", "max_seqs: 8, weights: fp32}")
SPLIT = LM_YAML.replace("max_seqs: 8}", "max_seqs: 8, weights: fp32, pipeline_parallel: 2}")
PROMPTS = ["the cat sat on", "a quick brown fox", "hello there, how"]


@pytest.fixture(scope="module")
def ray_split(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("ray-mp")
    repository = root / "models"
    for name, yaml in (("whole", WHOLE), ("split", SPLIT)):
        shutil.copytree(tiny_llama_dir, repository / name / "1")
        (repository / name / "model.yaml").write_text(yaml)
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    network = PrivateNetwork()
    # Two CPUs per node (Ray's count): the replica takes one on its node, each stage one.
    # Not 6379: `ray start` refuses a port another cluster on this machine (another test's,
    # in its own network namespace) has its GCS on, seen from the process list.
    cluster = RayCluster(root, 6390, env, cpus=2)
    deployment = Deployment(cluster, repository)
    try:
        cluster.start()
        deployment.deploy("--replicas", "1", "--load-models", "split",
                          "--ray-group-strategy", "STRICT_SPREAD")  # fmt: skip
        yield deployment
    finally:
        deployment.stop_driver()
        cluster.stop()
        network.leave()


def stage_pids(node: Node) -> list[int]:
    return [p for p in node.pids() if "GroupWorker" in _cmdline(p)]


def wait_one_stage_per_node(cluster: RayCluster, timeout: float = 120) -> list[list[int]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [stage_pids(node) for node in cluster.nodes]
        if [len(f) for f in found] == [1, 1] or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def one_process(repository: Path) -> list[str]:
    """Each prompt's greedy completion by the one-process engine (model "whole")."""

    async def main() -> list[str]:
        server = build_server(Settings(repository=repository, load_models=["whole"]))
        await server.start(wait=True)
        try:
            transport = httpx.ASGITransport(app=server.http_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers = [await client.post("/v1/completions", json=body("whole", p))
                           for p in PROMPTS]  # fmt: skip
                return [a.json()["choices"][0]["text"] for a in answers]
        finally:
            await server.stop()

    return asyncio.run(main())


def body(model: str, prompt: str, tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra}


def complete_all(client: httpx.Client, model: str) -> list[str]:
    """PROMPTS at once (continuous batching), answers in prompt order."""
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        reply = client.post("/v1/completions", json=body(model, PROMPTS[i]))
        assert reply.status_code == 200, reply.text
        answers[i] = reply.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [answers[i] for i in range(len(PROMPTS))]


def test_stages_on_two_nodes_answer_as_one_process(ray_split: Deployment) -> None:
    found = wait_one_stage_per_node(ray_split.cluster)
    assert [len(f) for f in found] == [1, 1], found  # STRICT_SPREAD: a stage per node
    want = one_process(ray_split.repository)
    with httpx.Client(base_url=HTTP, timeout=120) as client:
        assert complete_all(client, "split") == want


def test_a_killed_stage_fails_in_flight_with_503_and_the_group_is_placed_again(
    ray_split: Deployment,
) -> None:
    cluster = ray_split.cluster
    [[head_stage], [remote_stage]] = wait_one_stage_per_node(cluster)
    long = body("split", PROMPTS[0], tokens=400, ignore_eos=True)
    with httpx.Client(base_url=HTTP, timeout=120) as client:
        plain: dict[str, httpx.Response] = {}
        waiting = threading.Thread(
            target=lambda: plain.setdefault("r", client.post("/v1/completions", json=long))
        )
        waiting.start()
        time.sleep(0.5)  # it arrives first
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert '"text"' in first  # generating now, both requests in the running batch
            os.kill(remote_stage, signal.SIGKILL)  # the stage on the other node
            rest = "\n".join(lines)
        waiting.join(120)
        assert "model-parallel worker failed" in rest, rest[-2000:]
        assert plain["r"].status_code == 503, plain["r"].text
        assert "model-parallel worker failed" in plain["r"].json()["error"]["message"]
        # The group is placed again (a stage per node, new actors) and answers as before.
        assert complete_all(client, "split")[0] == one_process(ray_split.repository)[0]
    found = wait_one_stage_per_node(cluster)
    assert [len(f) for f in found] == [1, 1], found
    assert remote_stage not in found[1] and head_stage not in found[0]
