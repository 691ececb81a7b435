"""bf16/fp16 variants: only where the hardware computes them, else float32 and a warning."""

from __future__ import annotations

import pytest
import torch

from slimserve.errors import InvalidArgument
from slimserve.optimize.precision import (
    Bf16,
    Fp16,
    Precision,
    PrecisionFallbackWarning,
    bf16_supported,
    cpu_flags,
    to_precision_,
)
from tests.optimize.quant_fixtures import digits_mlp, digits_tensors, outputs


def test_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512_bf16 avx2\n")
    assert cpu_flags(info) >= {"avx512_bf16", "avx2"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert bf16_supported("cpu", frozenset({"amx_bf16"}))
    assert not bf16_supported("cpu", frozenset({"avx2"}))


def test_bf16_where_the_cpu_has_it():
    model = digits_mlp()
    x, _ = digits_tensors()
    dtype = to_precision_(model, Bf16(), flags=frozenset({"avx512_bf16"}))
    assert dtype == "bfloat16" and model.net[0].weight.dtype == torch.bfloat16
    got = outputs(model, x.bfloat16())
    assert (got.argmax(1) == outputs(digits_mlp(), x).argmax(1)).mean() > 0.97


def test_fp32_fallback_with_a_warning_elsewhere():
    model = digits_mlp()
    with pytest.warns(PrecisionFallbackWarning, match="avx512_bf16"):
        assert to_precision_(model, Bf16(), flags=frozenset({"avx2"})) == "float32"
    assert model.net[0].weight.dtype == torch.float32
    with pytest.warns(PrecisionFallbackWarning, match="fp16 inference on CPU"):
        assert to_precision_(model, Fp16(device="cpu")) == "float32"


def test_unknown_dtype_is_refused():
    with pytest.raises(InvalidArgument, match="bfloat16"):
        Precision("float8")  # type: ignore[arg-type]
