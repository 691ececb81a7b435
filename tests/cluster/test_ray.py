"""slimserve on a real two-node Ray cluster (each node one CPU, both on loopback inside a
private network namespace): answers equal a single process's, both replicas serve, routing
keeps models where they are resident, v2 gRPC answers on every replica's own port, prefix
affinity keeps a shared prompt (through a handle) or a prefix-key header (through HTTP) on one
replica, a killed replica is replaced with only its in-flight requests failing, a killed node
leaves the other node serving and its replica is placed on a replacement node, and
autoscaling goes up under load and back down.

One cluster and one deployment for the module (Ray starts slowly on two cores); the tests run
in file order and the last ones are destructive.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.app import build_server
from slimserve.config import Settings
from tests.cluster.load import BODY, Load
from tests.cluster.ray_cluster import METRICS_PORT, PrivateNetwork, RayCluster, can_unshare
from tests.e2e.conftest import Repo, write_mlp_onnx
from tests.transport.test_openai import LM_YAML

pytestmark = [
    pytest.mark.skipif(not can_unshare(), reason="needs root for a private network namespace"),
    pytest.mark.timeout(900),
]

SRC = Path(__file__).resolve().parents[2] / "src"
HTTP = "http://127.0.0.1:8000"
GRPC = "8001"  # every replica's own v2 gRPC port (Ray's gRPC proxy cannot carry v2)
MODELS = ("m1", "m2", "m3")


@dataclass
class Deployment:
    cluster: RayCluster
    repository: Path
    driver: subprocess.Popen[bytes] | None = None

    def deploy(self, *args: str, timeout: float = 240) -> None:
        """`slimserve serve --ray ADDRESS ...` (replacing any earlier driver) and wait until
        it answers. Only the ONNX model loads at start (no torch in a fresh replica: a
        replacement starts in seconds) unless `args` say otherwise."""
        self.stop_driver()
        cmd = [sys.executable, "-m", "slimserve", "serve", "--repository", str(self.repository),
               "--ray", self.cluster.address, "--http-port", "8000", "--grpc-port", GRPC,
               "--load-models", "mlp", "--log-format", "text", *args]  # fmt: skip
        with (self.cluster.root / "driver.log").open("ab") as log:  # the child keeps a copy
            self.driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.cluster.env)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.driver.poll() is None, self.log()
            if "is ready at" in self.log():
                return
            time.sleep(0.5)
        raise AssertionError(f"not deployed within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return (self.cluster.root / "driver.log").read_text(errors="replace")[-5000:]

    def stop_driver(self) -> None:
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signal.SIGTERM)
            self.driver.wait(60)

    def replica_pids(self) -> list[int]:
        return [p for node in self.cluster.nodes for p in node.replica_pids()]


def build_repository(model_repo: Repo, llama: Path, root: Path) -> Path:
    shutil.copytree(model_repo.root, root)
    shutil.rmtree(root / "broken")
    (root / "tiny").mkdir()
    (root / "tiny" / "model.yaml").write_text(LM_YAML)
    shutil.copytree(llama, root / "tiny" / "1")
    for i, name in enumerate(MODELS):  # small models loaded on demand, for routing
        (root / name).mkdir()
        (root / name / "model.yaml").write_text((root / "mlp" / "model.yaml").read_text())
        write_mlp_onnx(root / name / "1" / "model.onnx", model_repo.weights[f"mlp/{1 + i % 2}"])
    return root


@pytest.fixture(scope="module")
def ray_app(
    model_repo: Repo, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("ray")
    repository = build_repository(model_repo, tiny_llama_dir, root / "models")
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_metrics_report_interval_ms="1000")  # fmt: skip
    network = PrivateNetwork()
    cluster = RayCluster(root, 6379, env)
    deployment = Deployment(cluster, repository)
    try:
        cluster.start()
        # The tiny LLM resident on both replicas: prefix affinity then chooses between them.
        deployment.deploy("--replicas", "2", "--load-models", "mlp,tiny")
        yield deployment
    finally:
        deployment.stop_driver()
        cluster.stop()
        network.leave()


def replicas_seen(count: int, timeout: float = 90, path: str = "/v2/health/ready") -> set[str]:
    """Replica names answering `path` until `count` distinct ones have (or timeout)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=HTTP, timeout=10) as client:
        while len(seen) < count and time.monotonic() < deadline:
            try:
                resp = client.get(path)
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                seen.add(resp.headers["slimserve-replica"])
    return seen


def single_process(repository: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The same calls answered by one in-process server built by the same builder."""

    async def main() -> list[Any]:
        settings = Settings(repository=repository, load_models=["mlp", "tiny"])
        server = build_server(settings)
        await server.start(wait=True)
        try:
            transport = httpx.ASGITransport(app=server.http_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return [(await client.post(path, json=body)).json() for path, body in calls]
        finally:
            await server.stop()

    return asyncio.run(main())


def test_answers_through_the_cluster_equal_a_single_process(ray_app: Deployment):
    openai = pytest.importorskip("openai")
    completion = {"model": "tiny", "prompt": "the cat sat on", "max_tokens": 6, "temperature": 0}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6, "temperature": 0}  # fmt: skip
    calls = [("/v2/models/mlp/infer", BODY), ("/v2/models/mlp/versions/1/infer", BODY),
             ("/v1/completions", completion), ("/v1/chat/completions", chat)]  # fmt: skip
    expected = single_process(ray_app.repository, calls)
    with httpx.Client(base_url=HTTP, timeout=60) as client:
        for (path, body), want in zip(calls[:2], expected[:2], strict=True):
            got = client.post(path, json=body)
            assert got.status_code == 200 and got.headers["slimserve-replica"]
            assert got.json()["outputs"] == want["outputs"]
    client = openai.OpenAI(base_url=f"{HTTP}/v1", api_key="unused", max_retries=0)
    text = client.completions.create(**completion).choices[0].text
    assert text == expected[2]["choices"][0]["text"]
    stream = client.chat.completions.create(**chat, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == expected[3]["choices"][0]["message"]["content"]


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(sys.argv[1])
x = grpcclient.InferInput("input", [1, 4], "FP32")
x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
print(json.dumps(client.infer("mlp", [x]).as_numpy("logits").ravel().tolist()))
"""


def test_v2_grpc_on_every_replicas_own_port_equals_a_single_process(ray_app: Deployment):
    """tritonclient's gRPC client (in a child process: it lives in the cluster's network
    namespace, whatever threads gRPC started earlier in this one) against the replicas' port;
    each replica listens on it (SO_REUSEPORT: two LISTEN sockets on one machine)."""
    replicas_seen(2)
    sockets = Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]
    port = f":{int(GRPC):04X}"
    listening = [s for s in sockets if s.split()[1].endswith(port) and s.split()[3] == "0A"]
    assert len(listening) == 2, sockets
    want = single_process(ray_app.repository, [("/v2/models/mlp/infer", BODY)])[0]
    for _ in range(3):  # new connections: the kernel may hand each to either replica
        cmd = [sys.executable, "-c", GRPC_CLIENT, f"127.0.0.1:{GRPC}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=ray_app.cluster.env,
                             timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == pytest.approx(want["outputs"][0]["data"], rel=1e-6)


def test_both_replicas_serve_one_on_each_node(ray_app: Deployment):
    assert len(replicas_seen(2)) == 2
    per_node = [len(node.replica_pids()) for node in ray_app.cluster.nodes]
    assert per_node == [1, 1], per_node


def test_every_replica_is_in_the_nodes_prometheus_metrics(ray_app: Deployment):
    """One view: Prometheus scraping the nodes sees each replica's slimserve metrics."""
    replicas = replicas_seen(2)
    found: set[str] = set()
    deadline = time.monotonic() + 60
    while found != replicas and time.monotonic() < deadline:
        for port in (METRICS_PORT, METRICS_PORT + 1):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for line in text.splitlines():
                if line.startswith("ray_slimserve_resident_bytes{"):
                    found.update(re.findall(r'replica="([^"]+)"', line))
        time.sleep(1)
    assert found == replicas, (found, replicas)


def test_routing_keeps_each_model_where_it_is_resident(ray_app: Deployment):
    served: dict[str, Counter[str]] = {m: Counter() for m in MODELS}
    with httpx.Client(base_url=HTTP, timeout=30) as client:
        for _ in range(8):
            for model in MODELS:
                resp = client.post(f"/v2/models/{model}/infer", json=BODY)
                assert resp.status_code == 200, resp.text
                served[model][resp.headers["slimserve-replica"]] += 1
    # Sequential requests never queue, so residency alone decides: each model is loaded on
    # one replica and every later request for it goes there (Ray's default router spreads
    # them over both and loads every model twice).
    assert all(len(replicas) == 1 for replicas in served.values()), served


PREFIX_CLIENT = """
import json, sys, time
import ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
handle = serve.get_app_handle("slimserve")
prompt = "You are the help desk of a shop selling garden tools. Answer briefly. " * 8
replicas = []
for i in range(6):
    body = {"model": "tiny", "prompt": prompt + f"Question {i}:", "max_tokens": 2}
    answer = handle.post.remote("/v1/completions", body).result()
    assert answer["status"] == 200, answer
    replicas.append(answer["replica"])
    if i == 0:
        time.sleep(3)  # the replica publishes the prompt's prefix hashes (every second)
print(json.dumps(replicas))
"""


def test_prefix_affinity_sends_a_shared_prompt_prefix_to_the_replica_that_cached_it(
    ray_app: Deployment,
):
    """Through a Ray handle (`post`), whose body the router sees: the tiny LLM is resident on
    both replicas, so after the first call every call sharing its long prompt prefix goes to
    the replica that served it (by chance alone, 5 in a row: 1 in 32)."""
    replicas_seen(2)
    cmd = [sys.executable, "-c", PREFIX_CLIENT, ray_app.cluster.address]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ray_app.cluster.env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    replicas = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"prefix affinity: replicas in call order {replicas}")
    assert len(set(replicas[1:])) == 1 and replicas[1] == replicas[0], replicas


def test_http_clients_get_affinity_with_a_prefix_key_header(ray_app: Deployment):
    """Through Ray's HTTP proxy (body unread when it routes), the `slimserve-prefix-key`
    header: a key is first served by whichever replica answers a health check (the power of
    two choices), one key per replica; then OpenAI completions with that key and the tiny LLM
    (resident on both, so without the key its home order alone would decide) all go to the
    replica that served the key."""
    openai = pytest.importorskip("openai")
    owner: dict[str, str] = {}  # key -> the replica that served it first
    with httpx.Client(base_url=HTTP, timeout=10) as client:
        for i in range(40):
            key = f"conversation-{i}"
            resp = client.get("/v2/health/ready", headers={"slimserve-prefix-key": key})
            assert resp.status_code == 200, resp.text
            if resp.headers["slimserve-replica"] not in owner.values():
                owner[key] = resp.headers["slimserve-replica"]
            if len(owner) == 2:
                break
    assert len(owner) == 2, owner
    time.sleep(3)  # the replicas publish the keys they served (every second)
    client = openai.OpenAI(base_url=f"{HTTP}/v1", api_key="unused", max_retries=0)
    served: dict[str, list[str]] = {}
    for key in owner:
        headers = {"slimserve-prefix-key": key, "serve_multiplexed_model_id": "tiny"}
        for i in range(3):
            raw = client.completions.with_raw_response.create(
                model="tiny", prompt=f"Question {i}:", max_tokens=2, extra_headers=headers
            )
            served.setdefault(key, []).append(raw.headers["slimserve-replica"])
    print(f"prefix key affinity over HTTP: first served by {owner}, then {served}")
    assert served == {key: [replica] * 3 for key, replica in owner.items()}


def test_a_killed_replica_is_replaced_and_only_its_in_flight_requests_fail(
    ray_app: Deployment,
):
    before = replicas_seen(2)
    victim = ray_app.cluster.nodes[-1].replica_pids()[0]
    with Load(f"{HTTP}/v2/models/mlp/infer", threads=4, max_s=240) as load:
        load.wait_for(100)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        new = replicas_seen(2, timeout=120) - before
        replaced_s = time.monotonic() - killed
        load.wait_for(100)
    failed = sum(load.errors.values())
    print(f"replica kill: {failed} failed of {load.total()} {dict(load.errors)}; "
          f"replaced in {replaced_s:.1f} s")  # fmt: skip
    assert new, "no new replica answered"
    assert failed <= load.threads, load.errors


def test_a_killed_node_leaves_the_other_node_serving_and_its_replica_is_replaced(
    ray_app: Deployment,
):
    # The worker node dies under load (its raylet and replica at once) and the head node
    # serves alone. Then a replacement node joins (as a cloud or KubeRay would bring one) and
    # Ray places the second replica there again. The node starts with no client load: Ray
    # gives a starting node a fixed 30 s to register, which its agents' start-up exceeded on
    # this two-core machine under load (three tries in a row).
    cluster = ray_app.cluster
    with Load(f"{HTTP}/v2/models/mlp/infer", threads=4, max_s=300) as load:
        assert wait_for_replicas(ray_app, 2, timeout=90)
        assert cluster.nodes[-1].replica_pids(), "the second replica is not on the worker node"
        load.wait_for(100)
        cluster.kill_node(cluster.nodes[-1])  # the worker node: its raylet and replica
        killed, after = time.monotonic(), load.total()
        load.wait_for(200)  # served by the head node's replica
    served_alone, failed = load.total() - after, sum(load.errors.values())
    cluster.add_worker("worker-replacement")
    cluster.wait_started()
    replacement = cluster.nodes[-1]  # (started again if it gave up the first time)
    placed = wait_until(lambda: bool(replacement.replica_pids()), timeout=180)
    both = replicas_seen(2, timeout=120)
    replaced_s = time.monotonic() - killed
    print(f"node kill: {failed} failed of {load.total()} {dict(load.errors)}; a replica "
          f"answering on the new node {replaced_s:.1f} s after the kill")  # fmt: skip
    assert failed <= load.threads, load.errors
    assert served_alone >= 200
    assert placed, "no replica was placed on the replacement node"
    assert len(both) == 2


def test_autoscaling_adds_a_replica_under_load_and_returns_to_the_minimum(
    ray_app: Deployment,
):
    ray_app.deploy("--autoscale", "1,2")  # on the head and the replacement node
    assert wait_for_replicas(ray_app, 1, timeout=60)
    with Load(f"{HTTP}/v2/models/mlp/infer", threads=16, max_s=240) as load:
        started = time.monotonic()
        up = wait_for_replicas(ray_app, 2, timeout=60)
        up_s = time.monotonic() - started
    assert up, "no second replica under load"
    idle = time.monotonic()
    down = wait_for_replicas(ray_app, 1, timeout=90)
    down_s = time.monotonic() - idle
    print(f"autoscale: 2 replicas {up_s:.1f} s into the load, 1 again {down_s:.1f} s after "
          f"it; {load.ok} ok, {dict(load.errors)}")  # fmt: skip
    assert down, "did not scale back down when idle"
    assert not load.errors


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def wait_for_replicas(ray_app: Deployment, count: int, timeout: float) -> bool:
    return wait_until(lambda: len(ray_app.replica_pids()) == count, timeout)
