"""evaluate: the profile every variant gets, for torch modules and ONNX files alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimserve.errors import InvalidArgument
from slimserve.optimize.evaluation import evaluate, fidelity, latency_profile
from slimserve.optimize.export import export_onnx
from slimserve.optimize.quantize import DynamicInt8, quantize_
from slimserve.repository.schema import VariantProfile
from tests.optimize.quant_fixtures import accuracy, digits_mlp, digits_tensors, outputs

FAST = {"batch_sizes": (1, 4), "min_time_s": 0.01}


def test_profile_of_the_original_against_itself():
    x, y = digits_tensors("test")
    model = digits_mlp()
    profile = evaluate(model, x.numpy(), y.numpy(), reference=model, **FAST)
    assert profile["accuracy"] == pytest.approx(accuracy(model))
    assert profile["agreement"] == 1.0 and profile["max_abs_error"] == 0.0
    assert profile["parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    assert profile["memory_bytes"] == 4 * profile["parameters"]
    assert profile["latency_ms_batch1"] > 0 and profile["best_batch"] in (1, 4)
    assert profile["throughput_rps"] > 0
    machine = profile["machine"]
    assert machine["versions"]["torch"].startswith("2.") and machine["threads"] >= 1
    VariantProfile.model_validate({k: v for k, v in profile.items() if k != "machine"})


def test_quantized_and_onnx_candidates_report_size_nonzeros_and_fidelity(tmp_path):
    x, y = digits_tensors("test")
    original = digits_mlp()
    reference = outputs(original, x)
    onnx_path = export_onnx(original, x[:2], tmp_path / "m.onnx").path
    p_onnx = evaluate(onnx_path, x.numpy(), y.numpy(), reference=reference, **FAST)
    assert p_onnx["size_bytes"] == onnx_path.stat().st_size
    assert p_onnx["agreement"] == 1.0 and p_onnx["max_abs_error"] < 1e-4
    quantized = quantize_(digits_mlp(), DynamicInt8())
    p_q = evaluate(quantized, x.numpy(), y.numpy(), reference=reference, **FAST)
    assert p_q["memory_bytes"] < p_onnx["memory_bytes"] / 3
    assert 0.95 < p_q["agreement"] <= 1.0 and p_q["max_abs_error"] > 0


def test_nonzeros_count_pruned_weights():
    model = digits_mlp()
    with torch.no_grad():
        model.net[0].weight[:, :32] = 0
    profile = evaluate(model, digits_tensors()[0].numpy()[:50], **FAST)
    assert profile["parameters"] - profile["nonzeros"] == 64 * 32


def test_embeddings_are_compared_by_cosine():
    ref = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    result = fidelity(ref * 2.0, ref, embedding=True)  # same direction, other length
    assert result["cosine_mean"] == pytest.approx(1.0) and result["cosine_min"] == pytest.approx(1)
    flipped = fidelity(-ref, ref, embedding=True)
    assert flipped["cosine_mean"] == pytest.approx(-1.0)


def test_best_batch_is_the_one_with_most_rows_per_second():
    def predict(x):  # 1 ms per call whatever the batch: bigger batches win
        import time

        time.sleep(0.001)
        return x

    profile = latency_profile(predict, np.zeros((4, 2), np.float32), (1, 16), min_time_s=0.01)
    assert profile["best_batch"] == 16
    assert profile["throughput_rps"] > 1000


def test_data_that_does_not_fit_is_named():
    with pytest.raises(InvalidArgument, match=r"shape \(5, 10\)"):
        evaluate(digits_mlp(), np.zeros((5, 10), np.float32), **FAST)
    with pytest.raises(InvalidArgument, match="differs from the reference"):
        fidelity(np.zeros((2, 3)), np.zeros((2, 4)), embedding=False)
