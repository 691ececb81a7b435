"""Static int8 on PyTorch's quantized kernels (qnative): quint8 activations between layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.quantize import QAT, StaticInt8, quantize_, quantized_layers
from slimserve.optimize.quantize_native import NativeUnsupported, fusable_relus
from slimserve.runtimes.quantized import native as qnative
from slimserve.runtimes.quantized.variant import VariantModel
from slimserve.zoo import LeNet5
from tests.optimize.quant_fixtures import accuracy, digits_mlp, digits_tensors, outputs

pytestmark = pytest.mark.skipif(
    not qnative.native_available(), reason="this torch build has no quantized CPU engine"
)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {name: spec["kind"] for name, spec in quantized_layers(model).items()}


def test_lenet_converts_to_native_layers_with_relu_fused(lenet):
    _, q, _ = lenet
    assert _kinds(q) == {
        "features.0": "int8_native_conv2d",
        "features.1": "fused_away",
        "features.3": "int8_native_conv2d",
        "features.4": "fused_away",
        "classifier.1": "int8_native_linear",
        "classifier.2": "fused_away",
        "classifier.3": "int8_native_linear",
        "classifier.4": "fused_away",
        "classifier.5": "int8_native_linear",
    }
    specs = quantized_layers(q)
    assert specs["classifier.5"]["float_output"] and not specs["classifier.5"]["relu"]
    assert specs["features.0"]["relu"] and not specs["features.0"]["float_output"]


def test_native_output_is_float_and_close_to_the_original(lenet):
    model, q, x = lenet
    with torch.inference_mode():
        got, ref = q(x), model(x)
    assert got.dtype == torch.float32 and not got.is_quantized
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_first_call_at_batch_1_or_at_a_batch_gives_the_same_answers(lenet):
    _, q, x = lenet
    a, b = copy.deepcopy(q), copy.deepcopy(q)  # fresh packed weights in each
    for m in [*a.modules(), *b.modules()]:  # the quantized kernels at batch 1 too (not bf16)
        if isinstance(m, qnative.NativeInt8Linear):
            m.small_batch_rows = 0
    with torch.inference_mode():
        small_first = [a(x[:1]), a(x)]
        big_first = [b(x), b(x[:1])]
    assert torch.allclose(small_first[1], big_first[0], atol=1e-5)
    assert torch.allclose(small_first[0], big_first[1], atol=1e-5)
    assert torch.allclose(small_first[1][:1], small_first[0], atol=1e-5)


def test_native_model_round_trips_through_safetensors(tmp_path, lenet):
    _, q, x = lenet
    save_file({f"model.{k}": v for k, v in q.state_dict().items()}, str(tmp_path / "m.st"))
    rebuilt = VariantModel("slimserve.zoo:LeNet5", {}, quantized_layers(q))
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.st")), strict=True)
    assert np.array_equal(outputs(rebuilt, x), outputs(q, x))


def test_native_static_int8_keeps_digits_accuracy_and_weights_are_int8():
    x, _ = digits_tensors("train")
    model = quantize_(digits_mlp(), StaticInt8(calibration="percentile"), data=x)
    assert set(_kinds(model).values()) == {"int8_native_linear", "fused_away"}
    assert all(m.qweight.dtype == torch.int8 for m in model.modules() if hasattr(m, "qweight"))
    assert accuracy(model) >= accuracy(digits_mlp()) - 0.01


def test_qat_converts_to_native_layers():
    x, y = digits_tensors("train")
    config = QAT(epochs=1, lr=1e-4, fit_options={"progress": False})
    model = quantize_(digits_mlp(), config, data=(x, y))
    assert set(_kinds(model).values()) == {"int8_native_linear", "fused_away"}
    assert accuracy(model) >= accuracy(digits_mlp()) - 0.02


class _Residual(nn.Module):
    """y = fc2(relu(fc1(x)) + x): a quint8 + quint8 add, which the kernels do not take."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) + x)


def test_graph_that_cannot_carry_quint8_falls_back_to_gemm_under_auto():
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(32, 8)
    q = quantize_(copy.deepcopy(model), StaticInt8(), data=x)
    assert set(_kinds(q).values()) == {"int8_static_linear"}
    assert (outputs(q, x) - outputs(model, x)).max() < 0.05


def test_native_kernel_on_such_a_graph_is_refused_and_model_left_as_it_was():
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(32, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NativeUnsupported, match=r"quint8.*kernel=gemm"):
        quantize_(model, StaticInt8(kernel="native"), data=x)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_kernel_is_refused():
    with pytest.raises(InvalidArgument, match=r"kernel='fast'.*auto, native, gemm"):
        StaticInt8(kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="kernel"):
        QAT(kernel="nope")  # type: ignore[arg-type]


def test_only_a_relu_right_after_a_layer_in_a_sequential_is_fused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    assert fusable_relus(model, ["0", "2", "4"]) == {"0": "1"}


def test_activation_qparams_cover_the_range_in_uint8():
    scale, zp = qnative.activation_qparams(torch.tensor(-1.0), torch.tensor(3.0), False)
    assert scale == pytest.approx(4 / 255) and zp == round(1 / scale)
    scale7, zp7 = qnative.activation_qparams(torch.tensor(0.0), torch.tensor(2.0), True)
    assert scale7 == pytest.approx(2 / 127) and zp7 == 0


def _lenet_repository(root):
    import yaml

    from slimserve.repository import write_manifest

    torch.manual_seed(0)
    version = root / "lenet" / "1"
    version.mkdir(parents=True)
    save_file(LeNet5().state_dict(), str(version / "model.safetensors"))
    model_yaml = {
        "backend": "torch",
        "model_class": "slimserve.zoo:LeNet5",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (root / "lenet" / "model.yaml").write_text(yaml.safe_dump(model_yaml))
    write_manifest(version)
    return root


def test_served_lenet_static_int8_answers_like_the_original_within_its_profile(tmp_path):
    """`optimize --recipe static-int8` on a CNN writes native layers; the server's torch
    runtime loads the variant and its answers agree with the original's as profiled."""
    from slimserve.optimize.pipeline import Options, optimize
    from slimserve.repository import Repository
    from slimserve.runtimes import create_runtime

    root = _lenet_repository(tmp_path)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, 28, 28, generator=gen).numpy()
    y = torch.randint(0, 10, (256,), generator=gen).numpy()
    opts = Options(batch_sizes=(1,), min_time_s=0.01, max_eval_rows=256, progress=False)
    result = optimize(root, "lenet", ["static-int8"], (x, y), (x, y), opts)
    profile = result.variants[0]["profile"]
    target = Repository(root).target("lenet", 1, "static-int8")
    kinds = {s["kind"] for s in target.info.model_args["layers"].values()}
    assert kinds == {"int8_native_conv2d", "int8_native_linear", "fused_away"}
    answers = {}
    for variant in (None, "static-int8"):
        runtime = create_runtime(Repository(root).target("lenet", 1, variant))
        runtime.load()
        try:
            answers[variant] = runtime.infer({"input": x})["logits"]
        finally:
            runtime.unload()
    agreement = float((answers["static-int8"].argmax(1) == answers[None].argmax(1)).mean())
    assert agreement >= profile["agreement"] - 1e-9
    assert np.abs(answers["static-int8"] - answers[None]).max() <= profile["max_abs_error"] + 1e-6
