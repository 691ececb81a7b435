"""int4 planes for few-row decode steps (int4mm.py): exact where the weights allow, and the
same values as the bf16 copy that serves larger batches."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from slimserve.runtimes.llm import TextGenerationRuntime  # noqa: E402
from slimserve.runtimes.llm.int4mm import (  # noqa: E402
    GROUP,
    HAS_INT4_KERNEL,
    DualLinear,
    Int4Linear,
    four_bit_planes,
)
from slimserve.runtimes.llm.model import HAS_BF16, Batch, forward, new_kv_pool  # noqa: E402

from .test_runtime import full_logits  # noqa: E402

needs_kernel = pytest.mark.skipif(not HAS_INT4_KERNEL, reason="torch lacks the CPU int4 kernel")


def four_bit_weight(n: int = 32, k: int = 128) -> torch.Tensor:
    """What a GGUF Q4_1 tensor dequantizes to: per group of 32, levels 0..15 (both ends used)
    times a step, plus a minimum."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    step = torch.rand(n, k // GROUP, 1, generator=generator) * 0.02 + 0.001
    low = torch.randn(n, k // GROUP, 1, generator=generator) * 0.1
    return (q * step + low).view(n, k)


def test_a_four_bit_checkpoint_is_recognized_and_kept_exact() -> None:
    weight = four_bit_weight()
    assert four_bit_planes(weight) is not None
    assert four_bit_planes(torch.randn(32, 128)) is None  # a float checkpoint is not


@needs_kernel
def test_four_bit_weights_take_one_plane_that_reproduces_them() -> None:
    weight = four_bit_weight()
    linear = Int4Linear(weight)
    assert linear.planes == 1
    # The step and minimum are rounded to bf16 for the kernel: bf16-sized errors only.
    error = (linear.dequantize() - weight).abs().max()
    assert error <= 2**-7 * weight.abs().max()


@needs_kernel
def test_an_int8_per_group_tensor_is_two_exact_planes() -> None:
    """A GGUF Q8_0 tensor (d * q8, |q8| <= 127 with the maximum used) is reproduced exactly
    when d is a bf16 value; a float tensor is rounded to int8 levels per group."""
    n, k = 32, 128
    q8 = torch.randint(-127, 128, (n, k // GROUP, GROUP)).float()
    q8[..., 0] = 127
    d = (torch.rand(n, k // GROUP, 1) * 0.01 + 0.001).to(torch.bfloat16).float()
    weight = (q8 * d).view(n, k)
    linear = Int4Linear(weight)
    assert linear.planes == 2
    torch.testing.assert_close(linear.dequantize(), weight, rtol=0, atol=0)
    floats = torch.randn(n, k)
    step = floats.view(n, -1, GROUP).abs().amax(-1, keepdim=True) / 127
    error = (Int4Linear(floats).dequantize().view(n, -1, GROUP) - floats.view(n, -1, GROUP)).abs()
    assert bool((error <= step * 0.51).all())


@needs_kernel
def test_the_kernel_multiplies_what_dequantize_says() -> None:
    weight = torch.randn(48, 256) * 0.05
    linear = Int4Linear(weight)
    x = torch.randn(2, 256)
    expected = x.bfloat16().float() @ linear.dequantize().t()
    got = linear(x).float()
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)


@needs_kernel
@pytest.mark.skipif(not HAS_BF16, reason="the bf16 copy needs bf16 arithmetic")
def test_one_row_and_many_rows_give_the_same_products() -> None:
    """A decode step of one row (the C kernel or int4 planes) and of many (the bf16 copy)
    multiply the same weight values: only rounding of the activations (int8 per group of 32
    in the C kernel, bf16 otherwise) and sums differs, ~0.5% of the products' norm."""
    dual = DualLinear(four_bit_weight(64, 256))
    rows = torch.randn(8, 256)
    together = dual(rows).float()
    alone = torch.cat([dual(rows[i : i + 1]) for i in range(8)]).float()
    assert float((alone - together).norm() / together.norm()) < 0.015


@needs_kernel
@pytest.mark.skipif(not HAS_BF16, reason="bf16+int4 is bf16 where the CPU has it")
def test_bf16_int4_decodes_what_its_prefill_predicts(tiny_llama_dir: Path) -> None:
    """Token by token (one-row steps: the C kernel's int8 activations, or torch's int4 planes)
    against one prefill (the bf16 copy): the logits within rounding, and the same greedy
    tokens but at near ties (a random 30,522-token head has many). Cosine > 0.998, not 0.999:
    int8 activations per group of 32 (llama.cpp's Q8_0) round each value to 1/254 of its
    group's largest, a little coarser than bf16's 1/256 of the value itself (0.9989 seen)."""
    runtime = TextGenerationRuntime.load(tiny_llama_dir, weights="bf16+int4")
    assert isinstance(runtime.model.layers[0].gate_up, DualLinear)
    tokens, block = list(range(700, 723)), 4
    expected = full_logits(runtime, tokens)
    pool = new_kv_pool(runtime.model.shape, 8, block)
    table, agree = torch.arange(1, 8), 0
    for position, token in enumerate(tokens):
        step = Batch(
            tokens=torch.tensor([[token]]),
            positions=torch.tensor([[position]]),
            slots=(table[position // block] * block + position % block).view(1),
            block_tables=table[None, : position // block + 1],
            last=torch.tensor([0]),
        )
        logits = forward(runtime.model, pool, step)[0]
        assert torch.nn.functional.cosine_similarity(logits, expected[position], dim=0) > 0.998
        agree += int(logits.argmax()) == int(expected[position].argmax())
    assert agree >= 0.8 * len(tokens)


def test_auto_weights_follow_the_cpu(tiny_llama_dir: Path) -> None:
    from slimserve.runtimes.llm.model import auto_weights

    runtime = TextGenerationRuntime.load(tiny_llama_dir, weights="auto")
    assert auto_weights() == ("bf16+int4" if HAS_BF16 else "int8")
    assert runtime.model.shape.dtype == (torch.bfloat16 if HAS_BF16 else torch.float32)
