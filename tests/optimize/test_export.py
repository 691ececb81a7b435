"""export_onnx: outputs checked against PyTorch, dynamic batch, clear errors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.export import export_onnx
from slimserve.optimize.quantize import DynamicInt8, quantize_
from slimserve.zoo import LeNet5
from tests.optimize.quant_fixtures import digits_mlp, outputs


@pytest.mark.parametrize(("model", "shape"), [(digits_mlp(), (2, 64)), (LeNet5(), (2, 1, 28, 28))])
def test_export_matches_torch_and_has_a_dynamic_batch(tmp_path, model, shape):
    torch.manual_seed(0)
    result = export_onnx(model, torch.rand(*shape), tmp_path / "m.onnx", output_names=["logits"])
    assert result.max_abs_error < 1e-4
    session = ort.InferenceSession(str(result.path))
    assert session.get_inputs()[0].shape[0] == "batch"
    x = torch.rand(7, *shape[1:])  # another batch size than the example's
    got = session.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, outputs(model.eval(), x), atol=1e-4)


def test_fixed_batch_when_asked(tmp_path):
    result = export_onnx(digits_mlp(), torch.rand(3, 64), tmp_path / "m.onnx", dynamic_batch=False)
    assert ort.InferenceSession(str(result.path)).get_inputs()[0].shape == [3, 64]


def test_a_model_that_differs_from_its_export_is_refused(tmp_path):
    class Noisy(nn.Module):  # a different answer at every call: export cannot match it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    with pytest.raises(InvalidArgument, match="differs from PyTorch"):
        export_onnx(Noisy(), torch.zeros(2, 3), tmp_path / "m.onnx")
    result = export_onnx(Noisy(), torch.zeros(2, 3), tmp_path / "m2.onnx", atol=None)
    assert result.max_abs_error > 0.01


def test_names_must_match_inputs_and_quantized_layers_say_what_to_do(tmp_path):
    with pytest.raises(InvalidArgument, match="one name per input"):
        export_onnx(digits_mlp(), torch.rand(2, 64), tmp_path / "m.onnx", input_names=["a", "b"])
    quantized = quantize_(digits_mlp(), DynamicInt8())
    with pytest.raises(InvalidArgument, match="quantize_onnx"):
        export_onnx(quantized, torch.rand(2, 64), tmp_path / "q.onnx")
