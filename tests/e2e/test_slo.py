"""Profiles, plans and per-request objectives on variants made by `slimserve optimize`.

One repository: a random 64-2048-2048-10 MLP and two variants from quick recipes (int8,
structured:0.75); the original profiled by `slimserve profile` (a one-point sweep), then
served by a real `slimserve serve` and asked over HTTP and gRPC with tritonclient. The
expected choices are computed from the profiles the commands wrote, by the rule in
policies/slo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from safetensors.torch import save_file
from tritonclient.utils import InferenceServerException

from slimserve.cli import main
from slimserve.optimize.data import digits
from slimserve.optimize.pipeline import Options, optimize
from slimserve.policies.queueing import from_profile
from slimserve.repository import verify_manifest, write_manifest
from slimserve.serving.slo import tail_ms
from slimserve.zoo import MLP
from tests.e2e.conftest import ServerProcess, start_server, stop_server

RECIPES = ["int8", "structured:0.75"]
SIZES = [64, 2048, 2048, 10]  # wide enough that the pruned variant is clearly faster
SWEEP = ["--concurrency", "2", "--max-batch-size", "8", "--queue-delay-ms", "1"]
SWEEP += [
    "--duration",
    "0.3",
    "--warmup",
    "0.1",
    "--no-progress",
    "--open-loop-shares",
    "0.1,0.3,0.5",
]


MODEL_YAML = {
    "backend": "torch",
    "model_class": "slimserve.zoo:MLP",
    "model_args": {"sizes": SIZES},
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def slimserve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the profile's servers are still their own processes)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def random_mlp_repository(root: Path) -> Path:
    """mlp: a randomly initialised 64-2048-2048-10 MLP (torch, safetensors), version 1."""
    torch.manual_seed(0)
    version = root / "mlp" / "1"
    version.mkdir(parents=True)
    save_file(MLP(SIZES).state_dict(), str(version / "model.safetensors"))
    (root / "mlp" / "model.yaml").write_text(yaml.safe_dump(MODEL_YAML))
    write_manifest(version)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = random_mlp_repository(tmp_path_factory.mktemp("slo") / "models")
    opts = Options(batch_sizes=(1, 8), min_time_s=0.02, max_eval_rows=300, progress=False)
    optimize(root, "mlp", RECIPES, digits("train"), digits("test"), opts)
    # The original only: variants keep optimize's profile (tests/repository/test_profiles.py
    # covers writing into a variant.yaml).
    assert main(["profile", "mlp", "--repository", str(root), *SWEEP]) == 0
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Any:
    proc = start_server(repo, repo.parent / "server.log")
    yield proc
    stop_server(proc)


def profile(repo: Path, variant: str | None) -> dict[str, Any]:
    folder = repo / "mlp" / "1"
    path = (
        folder / "profile.yaml"
        if variant is None
        else folder / "variants" / variant / "variant.yaml"
    )
    return yaml.safe_load(path.read_text())["profile"]


def predicted_ms(repo: Path, variant: str | None) -> float:
    """What the server predicts for a lone one-row request from one client: the profile's
    batch-1 latency (a lone client's batch goes out without the batching delay; the sweep
    has no one-client point, so no transport overhead is added)."""
    return float(profile(repo, variant)["latency_ms_by_batch"]["1"])


def serving_tail_ms(repo: Path) -> float:
    """The least the original's serving path adds to its prediction (serving/slo.py)."""
    p = profile(repo, None)
    curve = tuple(sorted((int(k), float(v)) for k, v in p["latency_ms_by_batch"].items()))
    return tail_ms(from_profile(p, curve, 8, 1.0), 0.0)


def loss(repo: Path, variant: str | None) -> float:
    return 0.0 if variant is None else round((1 - profile(repo, variant)["agreement"]) * 100, 9)


def test_profile_writes_the_sweep_where_the_server_reads_it(repo: Path):
    p = profile(repo, None)
    (point,) = p["sweep"]
    assert point["concurrency"] == 2 and point["max_batch_size"] == 8
    assert point["throughput_rps"] > 0 and point["p99_ms"] >= point["p50_ms"] > 0
    assert p["memory_bytes"] > 0 and p["server_peak_rss_bytes"] > p["memory_bytes"]
    assert set(p["latency_ms_by_batch"]) == {"1", "2", "4", "8"}
    # The serving path under an open loop (Poisson) at 0.1, 0.3 and 0.5 of that throughput.
    opened = p["open_loop"]
    assert [o["rate_rps"] for o in opened] == [
        round(point["throughput_rps"] * share, 1) for share in (0.1, 0.3, 0.5)
    ]
    for o in opened:
        assert o["concurrency"] == 32 and o["max_batch_size"] == 8 and o["errors"] == 0
        assert o["throughput_rps"] > 0 and o["p99_ms"] >= o["p50_ms"] > 0
        assert o["requests"] > 0  # the fit's weight: how many answers its p99 rests on
    # The manifest covers profile.yaml and was refreshed, not broken.
    assert verify_manifest(repo / "mlp" / "1")
    assert (repo / "mlp" / "reports" / "1" / "profile-original.png").stat().st_size > 1000


def expected(repo: Path, slo_ms: float, budget: float) -> str:
    """The rule: of the units that fit, the least loss, then the fastest ('' = original)."""
    units = [None, "int8", "structured0.75"]
    fits = [
        (loss(repo, v), predicted_ms(repo, v), v or "")
        for v in units
        if loss(repo, v) <= budget and predicted_ms(repo, v) <= slo_ms
    ]
    return min(fits)[2] if fits else ""


def x_row() -> np.ndarray:
    return digits("test")[0][:1]


def ask_http(server: ServerProcess, **params: Any) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_row())
    result = client.infer("mlp", [inp], parameters=params or None)
    response = result.get_response()
    return {"model": response["model_name"], **response.get("parameters", {})}


def ask_grpc(server: ServerProcess, **params: Any) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_row())
    response = client.infer("mlp", [inp], parameters=params or None).get_response()
    params_out = {
        k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()
    }
    return {"model": response.model_name, **params_out}


@pytest.mark.parametrize("ask", [ask_http, ask_grpc], ids=["http", "grpc"])
def test_tight_and_loose_objectives_get_different_variants(repo, server, ask):
    fastest = min((None, "int8", "structured0.75"), key=lambda v: predicted_ms(repo, v))
    assert fastest == "structured0.75", "the pruned MLP must be the fastest unit in its profile"
    loose = ask(server, latency_slo_ms=1000.0, max_quality_loss=100.0)
    want = expected(repo, 1000.0, 100.0)
    assert loose["slo_variant"] == want and loose["slo_reachable"] is True
    assert loose["model"] == ("mlp" if not want else f"mlp:{want}")
    assert want != "structured0.75"  # it gives up quality: only a tight objective takes it
    # Tight: half of what the server now predicts for the original. The server scales each
    # unit's profile by how much slower it runs now (policies/slo.py), so on a loaded machine
    # the profile alone says too little: the original's own prediction sets the scale. The
    # time a request spends before the choice counts too, so an attempt may miss: then the
    # unit predicted first answers and says so.
    base = ask(server, latency_slo_ms=1000.0, max_quality_loss=0.0)
    assert base["model"] == "mlp" and base["slo_reachable"] is True
    # The original's profile has open-loop points: its prediction is a 99th percentile that
    # includes the serving path's tail, as the plan predicts it (the lone spread plus the
    # fitted extra at least; more when requests queue).
    assert base["predicted_latency_ms"] >= serving_tail_ms(repo) - 1e-3 > 0
    tight = base["predicted_latency_ms"] / 2
    answers = [ask(server, latency_slo_ms=tight, max_quality_loss=100.0) for _ in range(10)]
    for a in answers:
        assert a["model"] == (f"mlp:{a['slo_variant']}" if a["slo_variant"] else "mlp")
        if a["slo_reachable"]:
            assert a["slo_variant"] in ("int8", "structured0.75"), answers
            assert a["predicted_latency_ms"] <= tight
        else:
            # What the request spent before the choice left less than `tight` for every unit
            # (the answer's prediction leaves that time out): the unit predicted first
            # answered. Usually a variant; on a loaded machine it may be the original, since
            # each prediction scales by the unit's live slowdown (a 0.1 ms variant's recent
            # batches can run 20x its profile where a larger model's run 2x).
            assert a["slo_variant"] in ("", "int8", "structured0.75"), answers
            assert a["predicted_latency_ms"] > 0
    assert any(a["slo_reachable"] for a in answers), (tight, answers)
    # The same objective with no quality to give: the original, and it says so.
    strict = ask(server, latency_slo_ms=tight, max_quality_loss=0.0)
    assert (strict["model"], strict["slo_variant"], strict["slo_reachable"]) == ("mlp", "", False)
    # Without the parameter: the original, and no objective in the answer.
    plain = ask(server)
    assert plain["model"] == "mlp" and "slo_variant" not in plain


def test_a_named_variant_answers_as_named_and_the_objective_is_not_considered(server):
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
        "parameters": {"latency_slo_ms": 0.001, "max_quality_loss": 0},
    }
    url = f"http://{server.http_url}/v2/models/mlp:int8/infer"
    r = httpx.post(url, json=body, timeout=10)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "mlp:int8" and doc["parameters"] == {"slo_considered": False}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_row())
    params = {"latency_slo_ms": 0.001, "variant": "int8"}
    response = client.infer("mlp", [inp], parameters=params).get_response()
    assert response.model_name == "mlp:int8"
    assert response.parameters["slo_considered"].bool_param is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"latency_slo_ms": -1}, "latency_slo_ms' = -1: give the latency objective in ms"),
        ({"latency_slo_ms": "fast"}, "latency_slo_ms' = 'fast'"),
        ({"latency_slo_ms": 5, "max_quality_loss": 101}, "max_quality_loss' = 101"),
        ({"max_quality_loss": 1}, "'max_quality_loss' needs 'latency_slo_ms'"),
    ],
)
def test_bad_objectives_are_refused_with_the_fix(server, params, message):
    message = message.replace("in ms", "in milliseconds")
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
        "parameters": params,
    }
    r = httpx.post(f"http://{server.http_url}/v2/models/mlp/infer", json=body, timeout=10)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_row())
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer("mlp", [inp], parameters=params)


ONE = "machines: {cores: 2, memory_gb: 2, count: 1}\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plan_from_the_profiles_is_taken_by_the_server(repo, tmp_path, capsys):
    measured = profile(repo, None)  # the original's: the only unit with a sweep
    # At the highest open-loop point's rate, within 4x the worst p99 measured (a loaded
    # machine's p99s are noisy; this test is about the plan being served, not its accuracy).
    rate = measured["open_loop"][-1]["rate_rps"]
    p99 = 4 * max(p["p99_ms"] for p in measured["sweep"] + measured["open_loop"])
    workload = write(
        tmp_path / "workload.yaml",
        f"machines: {{cores: 2, memory_gb: 2, count: 2}}\n"
        f"models:\n  mlp: {{rate_rps: {rate}, p99_ms: {p99}, max_quality_loss: 0}}\n",
    )
    out = tmp_path / "plan"
    code, stdout, err = slimserve(
        capsys, "plan", "--repository", str(repo), "--workload", str(workload), "--out", str(out)
    )
    assert code == 0, err
    plan = yaml.safe_load((out / "plan.yaml").read_text())["models"]["mlp"]
    # The only unit with a sweep (variants have optimize's offline profile only).
    assert (plan["variant"], plan["replicas"]) == (None, 1)
    # Its p99 includes the serving path fitted on the profile's open-loop points.
    assert set(plan["serving_path"]) == {"extra_ms", "per_request_ms"}
    assert plan["serving_path"]["per_request_ms"] >= 0
    assert plan["serve_as"] in stdout
    settings = yaml.safe_load((out / "machine-0.yaml").read_text())
    key = "mlp/1" + (f":{plan['variant']}" if plan["variant"] else "")
    assert settings["load_models"] == [key]
    proc = start_server(repo, tmp_path / "planned.log", "--config", str(out / "machine-0.yaml"))
    try:
        index = httpx.post(f"http://{proc.http_url}/v2/repository/index", json={}).json()
        ready = {row["name"] for row in index if row["state"] == "READY"}
        assert ready == {plan["serve_as"]}  # only the planned unit is resident
    finally:
        stop_server(proc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "machines: {cores: 2, memory_gb: 2}\nmodels: {mlp: {rate_rps: 10, p99_ms: 5}}\n",
            "field 'machines.count': Field required; fix: give how many machines",
        ),
        (
            ONE + "models: {mlp: {rate_rps: -1, p99_ms: 5}}\n",
            "field 'models.mlp.rate_rps' = -1",
        ),
        (
            ONE + "models: {nope: {rate_rps: 1, p99_ms: 5}}\n",
            "field 'models.nope': no model 'nope' in the repository",
        ),
        ("- not a mapping\n", "expected a mapping at the top level (a workload file like"),
        (
            ONE + "models: {mlp: {rate_rps: 1, p99_ms: 0.001}}\n",
            "models.mlp.p99_ms = 0.001: no unit within the quality budget reaches it",
        ),
    ],
    ids=["missing-field", "negative-rate", "unknown-model", "not-a-mapping", "impossible-slo"],
)
def test_bad_workloads_and_impossible_objectives_say_what_to_fix(
    repo, tmp_path, capsys, text, message
):
    workload = write(tmp_path / "w.yaml", text)
    out = str(tmp_path / "out")
    code, _, err = slimserve(
        capsys, "plan", "--repository", str(repo), "--workload", str(workload), "--out", out
    )
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
