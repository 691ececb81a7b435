"""quantize_: the integer arithmetic, every config, calibration, QAT, ONNX, reload from disk."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.calibrate import EntropyObserver, MinMaxObserver, PercentileObserver
from slimserve.optimize.export import export_onnx
from slimserve.optimize.quantize import (
    QAT,
    DynamicInt8,
    StaticInt8,
    WeightOnlyInt4,
    WeightOnlyInt8,
    quantize_,
    quantize_onnx,
    quantized_layers,
)
from slimserve.runtimes import qmath
from slimserve.runtimes.quantized.layers import (
    Int8DynamicLinear,
    StaticInt8Conv2d,
    StaticInt8Linear,
    WeightOnlyInt4Linear,
)
from slimserve.runtimes.quantized.variant import VariantModel
from slimserve.zoo import LeNet5
from tests.optimize.quant_fixtures import accuracy, digits_mlp, digits_tensors, outputs

# --- arithmetic -------------------------------------------------------------------------------


def test_affine_params_map_the_range_onto_int8_and_zero_exactly():
    scale, zp = qmath.affine_params(torch.tensor(-1.0), torch.tensor(3.0))
    assert scale.item() == pytest.approx(4.0 / 255)
    q = qmath.quantize_affine(torch.tensor([-1.0, 0.0, 3.0]), scale, zp)
    assert q.tolist() == [-128, int(zp.item()), 127]
    # zero is representable exactly: it dequantizes to 0 (padding and ReLU outputs stay 0)
    assert ((q[1].float() - zp) * scale).item() == 0.0


def test_affine_range_is_widened_to_include_zero():
    scale, zp = qmath.affine_params(torch.tensor(2.0), torch.tensor(4.0))
    assert zp.item() == -128  # 0 is the lowest representable value
    assert scale.item() == pytest.approx(4.0 / 255)


def test_per_channel_weights_use_each_channel_range():
    w = torch.tensor([[1.0, -0.5], [100.0, 50.0]])
    q, scale = qmath.quantize_weight_per_channel(w)
    assert scale.tolist() == pytest.approx([1 / 127, 100 / 127])
    assert q.tolist() == [[127, -64], [127, 64]]
    qt, st = qmath.quantize_weight_per_tensor(w)
    assert qt[0].tolist() == [1, -1]  # the small channel loses its precision per tensor
    assert st.tolist() == pytest.approx([100 / 127] * 2)


def test_int4_pack_unpack_round_trips():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = qmath.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(qmath.unpack_int4(packed), q)


def test_int_matmul_is_exact():
    a = torch.randint(-127, 128, (7, 96), dtype=torch.int8)
    b = torch.randint(-127, 128, (96, 5), dtype=torch.int8)
    assert torch.equal(qmath.int_matmul(a, b), a.long().mm(b.long()).int())


def test_fake_quant_passes_gradients_straight_through():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    scale, zp = qmath.affine_params(torch.tensor(-1.0), torch.tensor(1.0))
    y = qmath.fake_quantize_affine(x, scale, zp)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(11))
    assert not torch.equal(y.detach(), x.detach())  # but the forward value is rounded


# --- observers --------------------------------------------------------------------------------


def _heavy_tailed() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 60.0  # a few outliers
    return x


def test_percentile_and_entropy_clip_outliers_minmax_keeps_them():
    x = _heavy_tailed()
    observers = [MinMaxObserver(), PercentileObserver(99.9), EntropyObserver()]
    for obs in observers:
        obs.observe(x)
    highs = [obs.range()[1].item() for obs in observers]
    assert highs[0] == 60.0
    assert highs[1] < 5.0 and highs[2] < 20.0


def test_entropy_keeps_the_full_range_of_uniform_data():
    obs = EntropyObserver()
    obs.observe(torch.rand(50000))
    assert obs.range()[1].item() > 0.9


def test_entropy_is_not_fooled_by_exact_zeros():
    """A ReLU's output, sparse: 3 in 4 values exact zeros, the rest half-normal. Zeros cost
    nothing at any threshold, so the range must stay near the data's (the search once let the
    zero spike pull it to 0.24 of a 3.7 range, and a LeNet-5 conv input lost 48 points)."""
    gen = torch.Generator().manual_seed(0)
    relu = torch.randn(50000, generator=gen).clamp(min=0)
    sparse = torch.where(torch.rand(50000, generator=gen) < 0.5, 0.0, relu)
    obs = EntropyObserver()
    obs.observe(sparse)
    assert obs.range()[1].item() > 0.75 * sparse.max().item()
    zeros = EntropyObserver()
    zeros.observe(torch.zeros(100))
    assert zeros.range()[1].item() == 0.0  # nothing to clip: minmax's own bound


# --- the configs on a trained MLP -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "max_drop"),
    [
        (DynamicInt8(), 0.01),
        (DynamicInt8(per_channel=False), 0.02),
        (WeightOnlyInt8(), 0.01),
        (WeightOnlyInt4(group_size=32), 0.03),
    ],
)
def test_weight_configs_keep_accuracy(config, max_drop):
    base = accuracy(digits_mlp())
    model = quantize_(digits_mlp(), config)
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    assert accuracy(model) >= base - max_drop


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
def test_static_int8_keeps_accuracy(calibration):
    x_train, _ = digits_tensors("train")
    config = StaticInt8(calibration=calibration, kernel="gemm")
    model = quantize_(digits_mlp(), config, data=x_train)
    assert {type(m) for m in model.modules()} >= {StaticInt8Linear}
    assert accuracy(model) >= accuracy(digits_mlp()) - 0.01


def test_static_int8_handles_conv_layers_of_lenet():
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.rand(32, 1, 28, 28)
    q = quantize_(copy.deepcopy(model), StaticInt8(kernel="gemm"), data=x)
    kinds = {m.kind for m in q.modules() if hasattr(m, "kind")}
    assert kinds == {"int8_static_conv2d", "int8_static_linear"}
    ref, got = outputs(model, x), outputs(q, x)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_dynamic_int8_matches_float_closely_and_is_4x_smaller():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    q = Int8DynamicLinear.from_float(lin)
    x = torch.randn(3, 5, 256)  # extra leading dims are kept
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    assert q.qweight_t.nbytes * 4 == lin.weight.nbytes


def test_filter_fn_chooses_layers():
    model = quantize_(digits_mlp(), DynamicInt8(), filter_fn=lambda m, name: name == "net.0")
    assert isinstance(model.net[0], Int8DynamicLinear)
    assert isinstance(model.net[2], nn.Linear)


def test_qat_fine_tunes_and_converts_to_static_int8():
    x, y = digits_tensors("train")
    config = QAT(epochs=1, lr=1e-4, fit_options={"progress": False}, kernel="gemm")
    model = quantize_(digits_mlp(), config, data=(x, y))
    assert {m.kind for m in model.modules() if hasattr(m, "kind")} == {"int8_static_linear"}
    assert accuracy(model) >= accuracy(digits_mlp()) - 0.02


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: DynamicInt8(bits=3), "bits=3"),
        (lambda: StaticInt8(calibration="mse"), "minmax"),
        (lambda: WeightOnlyInt4(group_size=48), "32, 64 or 128"),
        (lambda: StaticInt8(percentile=20), "percentile"),
        (lambda: QAT(lr=5), "lr"),
    ],
)
def test_impossible_configs_are_refused(make, words):
    with pytest.raises(InvalidArgument, match=words):
        make()


def test_static_without_data_says_what_to_give():
    with pytest.raises(InvalidArgument, match="calibration data"):
        quantize_(digits_mlp(), StaticInt8())


def test_layers_a_method_cannot_handle_are_named_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgument, match=r"'0'.*groups=2"):
        quantize_(model, StaticInt8(), data=torch.rand(4, 4, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InvalidArgument, match="'0' is a Conv2d"):
        quantize_(model, DynamicInt8(), filter_fn=lambda m, n: n in ("0", "2"))


def test_int4_group_that_does_not_divide_names_the_layer_and_what_fits():
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(InvalidArgument, match=r"'0' has 96 inputs.*\[32\]"):
        quantize_(model, WeightOnlyInt4(group_size=64))
    assert isinstance(model[0], nn.Linear)
    mixed = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 8))
    quantize_(mixed, WeightOnlyInt4(group_size=64, skip_indivisible=True))
    assert isinstance(mixed[0], nn.Linear) and isinstance(mixed[1], WeightOnlyInt4Linear)


def test_not_a_config_and_no_layers():
    with pytest.raises(InvalidArgument, match="not a quantization config"):
        quantize_(digits_mlp(), "int8")
    with pytest.raises(InvalidArgument, match="no layer"):
        quantize_(nn.Sequential(nn.ReLU()), DynamicInt8())


# --- saved to safetensors and rebuilt from class + args (how the server loads variants) ------


@pytest.mark.parametrize("config", [DynamicInt8(), WeightOnlyInt4(group_size=32), "static"])
def test_quantized_model_round_trips_through_safetensors(tmp_path, config):
    x, _ = digits_tensors("test")
    if config == "static":
        model = quantize_(digits_mlp(), StaticInt8(kernel="gemm"), data=x)
    else:
        model = quantize_(digits_mlp(), config)
    save_file({f"model.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "m.st"))
    rebuilt = VariantModel("slimserve.zoo:MLP", {"sizes": [64, 64, 10]}, quantized_layers(model))
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.st")), strict=True)
    assert np.array_equal(outputs(rebuilt, x), outputs(model, x))


def test_rebuilt_conv_layers_keep_their_geometry():
    conv = nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=1)
    layer = StaticInt8Conv2d.from_float(conv, torch.tensor(0.01), torch.tensor(0.0))
    twin = StaticInt8Conv2d(**layer.spec())
    twin.load_state_dict(layer.state_dict())
    x = torch.rand(2, 3, 11, 13)
    assert twin(x).shape == conv(x).shape
    assert torch.equal(twin(x), layer(x))


def test_int4_layer_is_about_7x_smaller():
    lin = nn.Linear(128, 64)
    q = WeightOnlyInt4Linear.from_float(lin, 64)
    stored = q.qweight.nbytes + q.group_scale.nbytes
    assert lin.weight.nbytes / stored > 6.5


# --- ONNX Runtime quantizers -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantize_onnx_is_smaller_and_close(tmp_path, mode):
    import onnx
    import onnxruntime as ort

    model = digits_mlp()
    x, _ = digits_tensors("test")
    src = export_onnx(model, x[:4], tmp_path / "m.onnx").path
    dst = quantize_onnx(src, tmp_path / "q.onnx", mode, x.numpy()[:512])
    assert dst.stat().st_size < src.stat().st_size / 2
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ("DynamicQuantizeLinear" in ops) if mode == "dynamic" else ("QuantizeLinear" in ops)
    got = ort.InferenceSession(str(dst)).run(None, {"input": x.numpy()})[0]
    agree = (got.argmax(1) == outputs(model, x).argmax(1)).mean()
    assert agree > 0.97


def test_quantize_onnx_bad_mode_and_missing_data(tmp_path):
    src = export_onnx(digits_mlp(), digits_tensors()[0][:2], tmp_path / "m.onnx").path
    with pytest.raises(InvalidArgument, match="dynamic or static"):
        quantize_onnx(src, tmp_path / "q.onnx", "float8")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="calibration data"):
        quantize_onnx(src, tmp_path / "q.onnx", "static", [])


def test_compact_names_shrink_the_file_and_change_no_output(tmp_path):
    import onnx
    import onnxruntime as ort

    x, _ = digits_tensors("test")
    src = export_onnx(digits_mlp(), x[:4], tmp_path / "m.onnx", output_names=["logits"]).path
    data = x.numpy()[:256]
    long = quantize_onnx(src, tmp_path / "long.onnx", "static", data, compact=False)
    short = quantize_onnx(src, tmp_path / "short.onnx", "static", data)
    assert short.stat().st_size < long.stat().st_size
    graph = onnx.load(str(short)).graph
    assert [i.name for i in graph.input] == ["input"] and graph.output[0].name == "logits"
    assert all(not n.name for n in graph.node)
    feeds = {"input": x.numpy()}
    a = ort.InferenceSession(str(long)).run(None, feeds)[0]
    b = ort.InferenceSession(str(short)).run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)


# --- simulated lower-bit QAT (accuracy studies) ----------------------------------------------


def test_fewer_bits_simulate_coarser_quantization_and_do_not_convert():
    from slimserve.optimize.quantize import convert_qat, prepare_qat

    x, _ = digits_tensors("train")
    errors = {}
    for bits in (8, 4, 2):
        sim = prepare_qat(digits_mlp(), x, weight_bits=bits, act_bits=bits).eval()
        errors[bits] = float(np.abs(outputs(sim, x) - outputs(digits_mlp(), x)).mean())
    assert errors[8] < errors[4] < errors[2]
    with pytest.raises(InvalidArgument, match=r"4-bit weights.*simulated"):
        convert_qat(prepare_qat(digits_mlp(), x, weight_bits=4))
    with pytest.raises(InvalidArgument, match="2 to 8 bits"):
        prepare_qat(digits_mlp(), x, act_bits=9)


@pytest.mark.parametrize("base_class", ["os:system", "builtins:dict", "slimserve.zoo:nope"])
def test_a_variant_names_only_torch_module_classes(base_class: str) -> None:
    """variant.yaml's base_class cannot make the server call any importable callable."""
    with pytest.raises(InvalidArgument, match="model_class"):
        VariantModel(base_class=base_class, base_args={}, layers={})
