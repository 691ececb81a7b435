"""deploy/: the image recipe, the KServe ServingRuntime and InferenceServices and the KubeRay
RayService, validated offline (no cluster here), and slimserve started with exactly the
arguments and ports the ServingRuntime gives, answering on the probes' paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.ray_cluster import PrivateNetwork, can_unshare
from tests.deploy.k8s_types import validate
from tests.e2e.conftest import Repo

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The documents a kustomization's resources hold (what `kubectl kustomize` emits with
    no patches), each checked to name an apiVersion, a kind and a name."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    docs = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((folder / resource).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), resource
            assert doc["metadata"]["name"], resource
            docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def kserve() -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "kserve")


def test_the_serving_runtime_is_a_valid_kserve_v2_runtime(kserve):
    (runtime,) = by_kind(kserve, "ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert set(spec) <= {"supportedModelFormats", "protocolVersions", "multiModel",
                         "containers", "annotations", "labels"}  # fmt: skip
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx", "pytorch", "huggingface"}
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    for i, container in enumerate(spec["containers"]):
        validate(container, "V1Container", f"containers[{i}]")
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert container["securityContext"]["runAsNonRoot"] is True


def test_inference_services_use_the_runtime_over_http_and_grpc(kserve):
    (runtime,) = by_kind(kserve, "ServingRuntime")
    services = by_kind(kserve, "InferenceService")
    assert {s["spec"]["predictor"]["model"]["protocolVersion"] for s in services} == {
        "v2", "grpc-v2",
    }  # fmt: skip
    grpc_port = _flag(runtime["spec"]["containers"][0]["args"], "--grpc-port")
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {"onnx", "pytorch", "huggingface"}
        for port in model.get("ports", []):
            validate(port, "V1ContainerPort")
            assert port["name"] == "h2c" and port["containerPort"] == int(grpc_port)


def test_the_ray_service_deploys_slimserves_own_application():
    from ray.serve.schema import ServeDeploySchema

    from slimserve.launch import ray_application

    (service,) = kustomize(DEPLOY / "kuberay")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "slimserve.launch:ray_application"
    assert app.args is not None
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.58.0"
    validate(cluster["headGroupSpec"]["template"], "V1PodTemplateSpec", "headGroupSpec")
    for group in cluster["workerGroupSpecs"]:
        validate(group["template"], "V1PodTemplateSpec", group["groupName"])
    # The import path builds the same deployment `slimserve serve --ray` makes (nothing runs).
    built = ray_application({**app.args, "repository": str(DEPLOY)})
    assert type(built).__name__ == "Application"


def test_the_image_runs_what_the_runtime_runs():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)", dockerfile, re.M)
    assert user and user.group(1) not in ("root", "0")
    exposed = set(re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split())  # type: ignore[union-attr]
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    args = runtime["spec"]["containers"][0]["args"]
    assert exposed == {_flag(args, "--http-port"), _flag(args, "--grpc-port")}
    probe = runtime["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    assert probe in dockerfile  # HEALTHCHECK asks the readiness path too
    assert 'ENTRYPOINT ["slimserve", "serve"]' in dockerfile


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


@pytest.mark.skipif(not can_unshare(), reason="needs root for a private network namespace")
def test_slimserve_serves_with_the_runtimes_exact_arguments_and_probes(
    model_repo: Repo, tmp_path: Path
):
    import numpy as np
    import tritonclient.grpc as grpcclient

    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    container = runtime["spec"]["containers"][0]
    # The manifest's own arguments; /mnt/models is where KServe's storage initializer puts the
    # storageUri: here the test repository stands in for it, nothing else changes.
    args = [a.replace("/mnt/models", str(tmp_path / "models")) for a in container["args"]]
    shutil.copytree(model_repo.root, tmp_path / "models")
    shutil.rmtree(tmp_path / "models" / "broken")
    # --host=0.0.0.0 as in a pod: inside a private network namespace (loopback only).
    network = PrivateNetwork()
    log = tmp_path / "server.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "slimserve", "serve", *args],
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            http = _flag(args, "--http-port")
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = container[kind]["httpGet"]
                assert str(get["port"]) == http
                assert _wait_ok(f"http://127.0.0.1:{get['port']}{get['path']}", proc), (
                    log.read_text()
                )
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{_flag(args, '--grpc-port')}")
            assert client.is_server_ready()
            inp = grpcclient.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            assert client.infer("mlp", [inp]).as_numpy("logits").shape == (1, 3)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        network.leave()
    assert proc.returncode == 0


def _wait_ok(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def test_the_validator_catches_a_misspelt_field_and_a_wrong_type():
    with pytest.raises(AssertionError, match=r"containers\[0\]\.imagee: not a field"):
        validate([{"name": "c", "imagee": "x"}], "List[V1Container]", "containers")
    with pytest.raises(AssertionError, match="is not a int"):
        validate({"containerPort": "8080"}, "V1ContainerPort")
