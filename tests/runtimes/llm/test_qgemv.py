"""The C kernel for few-row quantized matmuls (qgemv.py): exact weights where the checkpoint
allows, products within int8-activation rounding, the same result on one core or two, and a
clean fallback to torch when it cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from slimserve.runtimes.llm import qgemv  # noqa: E402
from slimserve.runtimes.llm.int4mm import HAS_INT4_KERNEL, DualLinear, Int4Linear  # noqa: E402
from slimserve.runtimes.llm.qgemv import QLinear  # noqa: E402

from .test_int4mm import four_bit_weight  # noqa: E402

needs_kernel = pytest.mark.skipif(not qgemv.available(), reason="no AVX-512 VNNI or compiler")


def q4_1_weight(n: int, k: int) -> torch.Tensor:
    """What a GGUF Q4_1 tensor dequantizes to: levels 0..15 (both ends used) times an fp16
    step, plus an fp16 minimum, per group of 32."""
    weight = four_bit_weight(n, k).view(n, k // 32, 32)
    low, high = weight.amin(dim=2, keepdim=True), weight.amax(dim=2, keepdim=True)
    step, low = ((high - low) / 15).half().float(), low.half().float()
    return (torch.round((weight - low) / step) * step + low).view(n, k)


def q8_0_weight(n: int, k: int) -> torch.Tensor:
    """What a GGUF Q8_0 tensor dequantizes to: q in -127..127 times an fp16 step per 32."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=generator).float()
    q[..., 0] = 127
    step = (torch.rand(n, k // 32, 1, generator=generator) * 0.01 + 1e-4).half().float()
    return (q * step).view(n, k)


@needs_kernel
def test_four_and_eight_bit_checkpoints_are_kept_exact() -> None:
    four = QLinear(q4_1_weight(64, 256))
    assert four.bits == 4
    assert torch.equal(four.dequantize(), q4_1_weight(64, 256))
    eight = QLinear(q8_0_weight(48, 128))
    assert eight.bits == 8
    assert torch.equal(eight.dequantize(), q8_0_weight(48, 128))


@needs_kernel
def test_other_weights_become_int8_per_group() -> None:
    weight = torch.randn(32, 192)
    linear = QLinear(weight)
    assert linear.bits == 8
    step = weight.view(32, 6, 32).abs().amax(dim=2, keepdim=True) / 127
    error = (linear.dequantize() - weight).view(32, 6, 32).abs()
    assert bool((error <= step * 0.51 + 1e-6).all())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_weights_it_holds(rows: int, dtype: torch.dtype) -> None:
    """Any number of rows (groups of four and the rest), fp32 or bf16 activations: within
    the rounding of int8 activations per group of 32 (~0.5% of the product's norm)."""
    for weight in (q4_1_weight(96, 320), torch.randn(80, 128)):
        linear = QLinear(weight)
        x = torch.randn(rows, weight.shape[1]).to(dtype)
        expected = x.float() @ linear.dequantize().T
        got = linear(x)
        assert got.shape == (rows, weight.shape[0]) and got.dtype == torch.float32
        assert float((got - expected).norm() / expected.norm()) < 0.015


@needs_kernel
def test_two_cores_give_the_same_bits_as_one() -> None:
    """The outputs are split between the cores, never a dot product: the same result."""
    linear = QLinear(q4_1_weight(512, 256))
    x = torch.randn(2, 1, 256)  # leading dimensions kept
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = linear(x)
        torch.set_num_threads(2)
        shared = [linear(x) for _ in range(20)]  # the pool's workers, woken and spinning
    finally:
        torch.set_num_threads(saved)
    assert alone.shape == (2, 1, 512)
    assert all(torch.equal(alone, y) for y in shared)


@needs_kernel
def test_dual_linear_takes_the_kernel_and_falls_back_when_switched_off() -> None:
    weight = q4_1_weight(64, 256)
    dual = DualLinear(weight)
    assert isinstance(dual.small, QLinear)
    x = torch.randn(8, 256)
    expected = x @ dual.small.dequantize().T
    for rows in (1, qgemv.MAX_ROWS, qgemv.MAX_ROWS + 1, 8, 9):  # qgemv, torch's int4, bf16
        got = dual(x[:rows]).float()  # within activation rounding (int8 or bf16)
        assert float((got - expected[:rows]).norm() / expected[:rows].norm()) < 0.015
    if HAS_INT4_KERNEL:  # a one-plane weight keeps torch's planes for 5..8 rows
        assert isinstance(dual.middle, Int4Linear)
    with qgemv.switched_off():
        assert isinstance(DualLinear(weight).small, Int4Linear)


def test_no_compiler_means_torch_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiler that fails (or none) leaves the torch path, with one warning."""
    monkeypatch.setenv("CC", "false")  # /bin/false: exits 1, builds nothing
    monkeypatch.setenv("SLIMSERVE_KERNEL_CACHE", str(tmp_path))
    qgemv._library.cache_clear()
    try:
        if not qgemv._cpu_has_isa():
            assert not qgemv.available()
            return
        assert not qgemv.available()
        assert "did not build" in caplog.text
        assert list(tmp_path.iterdir()) == []
    finally:
        qgemv._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_attention_writes_the_new_token_and_matches_torch(dtype: torch.dtype) -> None:
    """Grouped-query attention of one query over slots 4..4+keys-1 of a pool (2, Hkv,
    blocks, block_size, hd): the new K/V lands at the last slot, the output is torch's."""
    heads, kv_heads, hd, keys, first = 6, 2, 32, 11, 4
    cache = torch.randn(2, kv_heads, 5, 4, hd).to(dtype)
    q, k, v = torch.randn(heads, hd), torch.randn(kv_heads, hd), torch.randn(kv_heads, hd)
    out = qgemv.attend_one(q, k.to(dtype), v.to(dtype), cache, first, keys, 0.3)
    flat = cache.view(2, kv_heads, 20, hd)[:, :, first : first + keys].float()
    assert torch.equal(flat[0, :, -1], k.to(dtype).float())
    assert torch.equal(flat[1, :, -1], v.to(dtype).float())
    grouped = q.view(kv_heads, heads // kv_heads, hd)  # query heads of each K/V head
    expected = torch.nn.functional.scaled_dot_product_attention(
        grouped, flat[0], flat[1], scale=0.3
    )
    torch.testing.assert_close(out, expected.reshape(heads, hd), rtol=1e-4, atol=1e-5)
