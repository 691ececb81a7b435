"""Serving under pressure, end to end: a real `slimserve serve` process and a real HTTP client.

One server holds every scenario's model (a memory budget smaller than the ONNX models, a rate
limited model, a slow model with a fast variant, a model whose runtime fails while a file
exists, a cached model); two more share a real redis-server for the Redis response cache.
No timing assertions: orderings are made sure of by polling the server's own /metrics.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.redis_server import redis_server

WIDTH = 16  # toy models: input [-1, 16] -> output [-1, 16]
BIG = [64, 450, 450, 16]  # ONNX MLPs a, b, c, d: ~0.9 MB of weights each
TOY_MEMORY = 4096  # bytes each toy runtime reports
REQUEST_ID = "pressure-e2e-7f3a"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
LM_SERIES = ("slimserve_generation_", "slimserve_kv_cache_", "slimserve_prefix_cache_")


# -- the repository --------------------------------------------------------------------------


def write_mlp(path: Path, sizes: list[int], seed: int) -> int:
    """MLP 'input' [N, sizes[0]] -> 'output' [N, sizes[-1]]; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        inits += [
            numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], ["output" if last else f"a{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path.stat().st_size


def io(width_in: int, width_out: int) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, width_in]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, width_out]}],
    }


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def write_toy(root: Path, name: str, runtime: str, variant: str | None = None, **fields: Any):
    """A python-backend model served by a slimserve.testing runtime; optionally an ONNX
    variant (MLP 16 -> 16) that says it is cheap and close to the original."""
    args = {"memory": TOY_MEMORY, **fields.pop("model_args", {})}
    doc = {"backend": "python", "model_class": f"slimserve.testing:{runtime}"}
    write_yaml(
        root / name / "model.yaml", {**doc, "model_args": args, **io(WIDTH, WIDTH), **fields}
    )
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "README").write_text("served by model_class\n")
    if variant is not None:
        folder = root / name / "1" / "variants" / variant
        write_mlp(folder / "model.onnx", [WIDTH, WIDTH], seed=7)
        profile = {"latency_ms_batch1": 0.1, "agreement": 0.99}
        write_yaml(folder / "variant.yaml", {"backend": "onnx", "profile": profile})


def build_repo(root: Path, fault: Path) -> int:
    """Every scenario's model; returns the memory budget (bytes): two of a/b/c/d fit, not
    three, and `huge` does not fit alone."""
    size = 0
    for seed, name in enumerate("abcd"):
        size = write_mlp(root / name / "1" / "model.onnx", BIG, seed)
        write_yaml(root / name / "model.yaml", {"backend": "onnx", **io(BIG[0], BIG[-1])})
    write_mlp(root / "huge" / "1" / "model.onnx", [64, 1400, 1400, 16], seed=9)
    write_yaml(root / "huge" / "model.yaml", {"backend": "onnx", **io(64, 16)})
    batch1 = {"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 1}
    write_toy(root, "limited", "EchoRuntime", limits={"rate": 1, "burst": 2})
    write_toy(
        root,
        "slow",
        "SlowRuntime",
        "fast",
        model_args={"delay_s": 1.0, "entered_file": str(fault.with_name("slow-entered"))},
        batching=batch1,
        degrade={"allow": False, "queue_fraction": 0.5, "recover_s": 0.5},
    )
    write_toy(
        root,
        "flaky",
        "FailingRuntime",
        "fallback",
        model_args={"fail_file": str(fault)},
        breaker={"consecutive_failures": 2, "open_s": 1.0, "probe_calls": 1},
        degrade={"allow": False, "recover_s": 0.0},
    )
    write_toy(root, "cached", "EchoRuntime", cache={"policy": "lru", "max_bytes": 1 << 20})
    return int(2.5 * size) + 64 * 1024


TOYS = "limited,slow,flaky,cached"


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault") / "fault"


@pytest.fixture(scope="module")
def budget_server(
    tmp_path_factory: pytest.TempPathFactory, fault: Path
) -> Iterator[tuple[ServerProcess, int]]:
    root = tmp_path_factory.mktemp("pressure") / "models"
    budget = build_repo(root, fault)
    server = start_server(
        root,
        root.parent / "server.log",
        "--memory-budget-bytes",
        str(budget),
        "--load-models",
        TOYS,
        "--log-format",
        "json",
        "--log-level",
        "info",
    )
    yield server, budget
    stop_server(server)


@pytest.fixture(scope="module")
def client(budget_server: tuple[ServerProcess, int]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{budget_server[0].http_url}", timeout=30) as c:
        yield c


# -- helpers ---------------------------------------------------------------------------------


def infer(
    client: httpx.Client, model: str, width: int = WIDTH, value: float = 1.0, **kw: Any
) -> httpx.Response:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, width], "data": [value] * width}
        ]
    }
    if "parameters" in kw:
        body["parameters"] = kw.pop("parameters")
    return client.post(f"/v2/models/{model}/infer", content=orjson.dumps(body), **kw)


def metrics(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def served(response: httpx.Response) -> tuple[str, bool]:
    doc = response.json()
    return doc["model_name"], bool(doc.get("parameters", {}).get("degraded"))


# -- residency -------------------------------------------------------------------------------


def test_budget_smaller_than_the_models_loads_and_evicts(client, budget_server):
    _, budget = budget_server
    before = metrics(client)
    for name in "abca":  # the third needs room, the fourth may have been evicted
        assert infer(client, name, width=BIG[0]).status_code == 200
    after = metrics(client)
    assert after["slimserve_model_loads_total"] - before["slimserve_model_loads_total"] >= 3
    assert after["slimserve_model_evictions_total"] >= 1
    assert after["slimserve_resident_bytes"] <= budget == after["slimserve_memory_budget_bytes"]
    assert any(k.startswith('slimserve_cold_load_seconds{model="c"') for k in after)


def test_a_model_larger_than_the_budget_is_refused_with_the_figures(client):
    response = infer(client, "huge", width=64)
    assert response.status_code == 503 and "retry-after" not in response.headers  # never fits
    assert "memory budget" in response.json()["error"]


def test_request_id_is_echoed_and_in_the_json_log_lines(client, budget_server):
    server, _ = budget_server
    response = infer(client, "d", width=BIG[0], headers={"X-Request-ID": REQUEST_ID})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == REQUEST_ID
    lines = [orjson.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    mine = [ln for ln in lines if ln.get("request_id") == REQUEST_ID]
    assert any("loaded d/1" in ln["message"] for ln in mine), mine  # d loads on this request


# -- admission -------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(client):
    statuses = [infer(client, "limited") for _ in range(5)]
    limited = [r for r in statuses if r.status_code == 429]
    assert statuses[0].status_code == 200 and limited
    assert int(limited[0].headers["retry-after"]) >= 1
    assert "rate limit" in limited[0].json()["error"]


def test_full_queue_sheds_at_once_and_degradation_serves_the_variant(client, fault):
    entered = fault.with_name("slow-entered")  # the slow runtime counts its batches here

    def batches() -> int:
        text = entered.read_text().strip() if entered.exists() else ""
        return int(text or 0)

    def queued() -> bool:
        return metrics(client).get('slimserve_queue_depth{model="slow",variant=""}') == 1

    def attempt() -> tuple[httpx.Response, httpx.Response] | None:
        """The first request inside the model, the second in the queue (of one): a third is
        refused at once and a degradable one goes to the variant. None when the machine was
        so slow that the first finished (1 s) before the third and fourth were answered."""
        before = batches()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(infer, client, "slow")
            wait_for(lambda: batches() > before, "the first request to be inside the model")
            waiting = pool.submit(infer, client, "slow")
            wait_for(lambda: queued() or waiting.done(), "the second request to queue")
            refused = infer(client, "slow")
            degraded = infer(client, "slow", parameters={"degrade": True})
            held = batches() == before + 1  # the second never left the queue meanwhile
            assert running.result().status_code == waiting.result().status_code == 200
        return (refused, degraded) if held else None

    for _ in range(5):
        outcome = attempt()
        if outcome is not None:
            break
    assert outcome is not None, "the slow model never held its queue long enough"
    refused, degraded = outcome
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert degraded.status_code == 200, degraded.text
    assert served(degraded) == ("slow:fast", True)
    m = metrics(client)
    assert m["slimserve_requests_shed_total"] >= 1
    assert m["slimserve_requests_degraded_total"] >= 1


def test_failing_runtime_opens_its_breaker_falls_back_and_recovers(client, fault):
    fault.touch()
    try:
        codes = []
        for _ in range(10):
            codes.append(infer(client, "flaky"))
            if codes[-1].status_code == 503:
                break
        assert [r.status_code for r in codes[:2]] == [500, 500]
        assert codes[-1].status_code == 503 and "circuit breaker" in codes[-1].json()["error"]
        assert int(codes[-1].headers["retry-after"]) >= 1
        assert metrics(client)['slimserve_breaker_state{model="flaky",variant=""}'] == 2
        # While the breaker is open a degradable request goes to the fallback. A client stalled
        # past open_s (1 s) would instead be let through as the half-open probe, fail on the
        # fault and reopen the breaker: then the next one goes to the fallback.
        for _ in range(3):
            fallback = infer(client, "flaky", parameters={"degrade": True})
            if fallback.status_code != 500:
                break
        assert fallback.status_code == 200 and served(fallback) == ("flaky:fallback", True)
    finally:
        fault.unlink()
    # Once the fault is gone, a half-open probe succeeds and the breaker closes.
    wait_for(lambda: infer(client, "flaky").status_code == 200, "the breaker to close")
    assert metrics(client)['slimserve_breaker_state{model="flaky",variant=""}'] == 0
    assert served(infer(client, "flaky")) == ("flaky", False)


# -- response cache --------------------------------------------------------------------------


def inference_count(client: httpx.Client, model: str) -> int:
    stats = client.get(f"/v2/models/{model}/stats").json()["model_stats"]
    return int(stats[0]["inference_count"])


def test_second_identical_request_is_a_cache_hit(client):
    first, second = infer(client, "cached", value=3.0), infer(client, "cached", value=3.0)
    assert first.status_code == second.status_code == 200
    assert first.json()["outputs"] == second.json()["outputs"]
    m = metrics(client)
    assert m['slimserve_cache_hits_total{model="cached"}'] == 1
    assert m['slimserve_cache_misses_total{model="cached"}'] == 1
    assert inference_count(client, "cached") == 1  # the model ran once


def test_redis_cache_is_shared_by_two_servers(tmp_path):
    root = tmp_path / "models"
    write_toy(root, "cached", "EchoRuntime", cache={"max_bytes": 1 << 20, "ttl_s": 60})
    with redis_server(tmp_path) as url:
        servers = [
            start_server(root, tmp_path / f"server{i}.log", "--redis-url", url) for i in (0, 1)
        ]
        try:
            a, b = (httpx.Client(base_url=f"http://{s.http_url}", timeout=30) for s in servers)
            with a, b:
                first = infer(a, "cached", value=5.0)
                second = infer(b, "cached", value=5.0)
                assert first.status_code == second.status_code == 200
                assert first.json()["outputs"] == second.json()["outputs"]
                assert metrics(b)['slimserve_cache_hits_total{model="cached"}'] == 1
                assert inference_count(a, "cached") == 1
                assert inference_count(b, "cached") == 0  # B answered from A's entry
        finally:
            for s in servers:
                stop_server(s)


# -- observability ---------------------------------------------------------------------------


def test_metrics_has_every_series_the_dashboard_queries(client):
    infer(client, "a", width=BIG[0])
    text = client.get("/metrics").text
    exported = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln[:1] != "#"}
    wanted = set(re.findall(r"slimserve_[a-z_]+", DASHBOARD.read_text()))
    # Language-model series exist only with a text-generation model (not in this repository):
    # tests/e2e/test_llm_serving.py checks those against a server that has one.
    wanted = {w for w in wanted if not w.startswith(LM_SERIES)}
    assert wanted and not wanted - exported, sorted(wanted - exported)
