"""Every variant `optimize` writes loads in the server's runtimes and answers like the original.

The runtimes are the serving side's (slimserve.runtimes.create_runtime on a repository target),
so this checks the hand-over: artifact, backend, model_class/model_args in variant.yaml.
"""

from __future__ import annotations

import pytest

from slimserve.optimize.data import digits
from slimserve.optimize.pipeline import Options, optimize
from slimserve.repository import Repository
from slimserve.runtimes import create_runtime
from tests.optimize.quant_fixtures import make_repository

RECIPES = {
    # recipe -> variant name; the comment says how the server must load it
    "onnx": "onnx",  # backend: onnx in variant.yaml
    "onnx+int8": "onnx_int8",  # backend: onnx, int8 QDQ/MatMulInteger graph
    "prune:0.5": "prune0.5",  # same class and args as model.yaml
    "int8": "int8",  # model_class/model_args override in variant.yaml
    "structured:0.25": "structured0.25",  # override (resized layers)
    "share:bits=5": "sharebits5",  # artifact: model.dcz (Deep Compression storage)
    "static-int8": "static-int8",  # override: quint8 layers on torch's quantized kernels
    "qat:epochs=1": "qatepochs1",  # override: the same layers after QAT
}
NEEDS_OVERRIDE = {"int8", "structured0.25", "static-int8", "qatepochs1"}
NEEDS_DCZ = {"sharebits5"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("served"))
    opts = Options(batch_sizes=(1,), min_time_s=0.01, max_eval_rows=200)
    result = optimize(root, "mlp", list(RECIPES), digits("train"), digits("test"), opts)
    return root, {v["name"]: v for v in result.variants}


def _answers(root, variant):
    target = Repository(root).target("mlp", 1, variant)
    runtime = create_runtime(target)
    runtime.load()
    try:
        x = digits("test")[0][:200]
        return runtime.infer({"input": x})["logits"]
    finally:
        runtime.unload()


@pytest.mark.parametrize("variant", sorted(RECIPES.values()))
def test_variant_is_served_within_its_profiled_agreement(served, variant):
    root, variants = served
    if variant in NEEDS_OVERRIDE | NEEDS_DCZ:
        info = Repository(root).target("mlp", 1, variant).info
        if variant in NEEDS_OVERRIDE:
            assert getattr(info, "model_class", None), "variant.yaml must carry model_class"
        else:
            assert getattr(info, "artifact", None) == "model.dcz"
        if variant in ("static-int8", "qatepochs1"):  # the fast path, not the float-in GEMM
            kinds = {spec["kind"] for spec in info.model_args["layers"].values()}
            assert kinds == {"int8_native_linear", "fused_away"}
    original = _answers(root, None)
    got = _answers(root, variant)
    agreement = float((got.argmax(1) == original.argmax(1)).mean())
    assert agreement >= variants[variant]["profile"]["agreement"] - 1e-9
