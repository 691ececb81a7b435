"""Native static int8 at small batches: the Linear's bf16 x int8-weight path (qnative) and the
Sequential that calls its children directly (qsequential)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimserve.optimize.quantize import StaticInt8, quantize_, quantized_layers
from slimserve.runtimes.quantized import native as qnative
from slimserve.runtimes.quantized.sequential import NativeSequential, use_native_sequentials
from slimserve.runtimes.quantized.variant import VariantModel
from slimserve.zoo import LeNet5
from tests.optimize.quant_fixtures import outputs

pytestmark = pytest.mark.skipif(
    not qnative.native_available(), reason="this torch build has no quantized CPU engine"
)
needs_bf16 = pytest.mark.skipif(
    not qnative.bf16_int8_available(), reason="no bf16 instructions: the small path is off"
)


def _linears(model: nn.Module) -> list[qnative.NativeInt8Linear]:
    return [m for m in model.modules() if isinstance(m, qnative.NativeInt8Linear)]


def _quantized_kernels_only(model: nn.Module) -> nn.Module:
    """A copy whose linears use the quantized kernels at every batch size (the previous path)."""
    twin = copy.deepcopy(model)
    for m in _linears(twin):
        m.small_batch_rows = 0
    return twin


def _plain_sequentials(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, NativeSequential):
            m.__class__ = nn.Sequential
    return twin


def _linear_layer(k: int, n: int, *, relu: bool, float_output: bool) -> qnative.NativeInt8Linear:
    torch.manual_seed(1)
    dense = nn.Linear(k, n)
    layer = qnative.NativeInt8Linear(k, n, True, relu, float_output)
    in_q = qnative.activation_qparams(torch.tensor(0.0), torch.tensor(1.0), False)
    out_q = qnative.activation_qparams(torch.tensor(-2.0), torch.tensor(2.0), False)
    layer.load_float(dense.weight, dense.bias, True, in_q, out_q)
    return layer.eval()


@needs_bf16
def test_small_batches_agree_with_the_quantized_kernels(lenet):
    _, q, x = lenet
    reference = _quantized_kernels_only(q)
    for rows in (1, 5, 16):
        got, ref = outputs(q, x[:rows]), outputs(reference, x[:rows])
        assert got.dtype == np.float32 and got.shape == (rows, 10)
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert all(m._packed is not None and m._packed.small is not None for m in _linears(q))
    # above 16 rows: the quantized kernels, as before
    assert np.allclose(outputs(q, x[:17]), outputs(reference, x[:17]), atol=1e-5)


@needs_bf16
def test_the_bf16_kernel_runs_up_to_16_rows_only(monkeypatch, lenet):
    real, rows = qnative._int8pack_mm(), []

    def spy(x, weight, scale):
        rows.append(x.shape[0])
        return real(x, weight, scale)

    monkeypatch.setattr(qnative, "_int8pack_mm", lambda: spy)
    q = copy.deepcopy(lenet[1])  # packs again, with the spy
    outputs(q, lenet[2][:2])  # packing checks each layer on 3 rows first
    rows.clear()
    outputs(q, lenet[2][:16])
    outputs(q, lenet[2][:17])
    assert rows == [16, 16, 16]


@needs_bf16
@pytest.mark.parametrize("float_output", [False, True])
def test_small_path_pads_k_to_16_and_keeps_leading_dims(float_output):
    layer = _linear_layer(84, 10, relu=not float_output, float_output=float_output)
    x = torch.rand(2, 3, 84)
    with torch.inference_mode():
        got = layer(x)
    weight = layer.qweight.float() * layer.weight_scale[:, None]
    ref = nn.functional.linear(x, weight, layer.bias)
    ref = ref if float_output else ref.relu()
    assert got.shape == (2, 3, 10)
    assert got.dtype == (torch.float32 if float_output else torch.bfloat16)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()


def test_a_kernel_that_disagrees_with_the_float_product_is_not_used(monkeypatch):
    monkeypatch.setattr(qnative, "bf16_int8_available", lambda: True)
    monkeypatch.setattr(qnative, "_int8pack_mm", lambda: lambda x, w, s: torch.zeros(len(x), 10))
    layer = _linear_layer(84, 10, relu=False, float_output=True)
    x = torch.rand(1, 84)
    with torch.inference_mode():
        got = layer(x)
    assert layer._packed is not None and layer._packed.small is None
    assert got.abs().max() > 0  # the quantized kernel answered


def test_no_small_path_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(qnative, "bf16_int8_available", lambda: False)
    layer = _linear_layer(64, 10, relu=False, float_output=True)
    with torch.inference_mode():
        layer(torch.rand(1, 64))
    assert layer._packed is not None and layer._packed.small is None


def test_a_small_calibration_batch_still_marks_the_output_layer(lenet):
    model, _, x = lenet
    q = quantize_(copy.deepcopy(model), StaticInt8(), data=x[:4])  # 4 rows: small path range
    assert quantized_layers(q)["classifier.5"]["float_output"]
    got = outputs(q, x[:1])
    assert got.dtype == np.float32 and got.shape == (1, 10)


def test_converted_sequentials_are_native_and_answer_like_plain_ones(lenet):
    _, q, x = lenet
    assert type(q.features) is NativeSequential and type(q.classifier) is NativeSequential
    plain = _plain_sequentials(q)
    for rows in (1, 64):
        assert np.array_equal(outputs(q, x[:rows]), outputs(plain, x[:rows]))
    assert use_native_sequentials(LeNet5()) == 0  # float models are left alone


def test_hooks_on_children_still_run(lenet):
    _, q, x = lenet
    q = copy.deepcopy(q)
    seen: list[str] = []
    handles = [
        q.classifier[1].register_forward_hook(lambda *_: seen.append("linear")),
        q.features[2].register_forward_pre_hook(lambda *_: seen.append("pool")),
    ]
    before = outputs(q, x[:1])
    assert seen == ["pool", "linear"]
    for h in handles:
        h.remove()
    assert np.array_equal(outputs(q, x[:1]), before) and len(seen) == 2


def test_changing_a_child_rebuilds_the_plan(lenet):
    _, q, x = lenet
    q = copy.deepcopy(q)
    outputs(q, x[:1])
    q.classifier[5] = nn.Identity()  # the logits layer gone: the 84 features come out
    assert outputs(q, x[:1]).shape == (1, 84)
    q.classifier.append(nn.Unflatten(1, (12, 7)))
    assert outputs(q, x[:1]).shape == (1, 12, 7)


def test_reloaded_variant_uses_the_same_paths(tmp_path, lenet):
    _, q, x = lenet
    save_file({f"model.{k}": v for k, v in q.state_dict().items()}, str(tmp_path / "m.st"))
    rebuilt = VariantModel("slimserve.zoo:LeNet5", {}, quantized_layers(q))
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.st")), strict=True)
    assert type(rebuilt.model.features) is NativeSequential
    for rows in (1, 16, 64):
        assert np.array_equal(outputs(rebuilt, x[:rows]), outputs(q, x[:rows]))
