"""The C kernel for few-row quantized matmuls (qgemv.py): exact weights where the checkpoint
allows, products within int8-activation rounding, the same result on one core or two, and a
clean fallback to torch when it cannot be built."""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file

from slimserve.runtimes.llm import TextGenerationRuntime, fused, qgemv  # noqa: E402
from slimserve.runtimes.llm.int4mm import (  # noqa: E402
    HAS_INT4_KERNEL,
    DualLinear,
    Int4Linear,
    choose_paths,
)
from slimserve.runtimes.llm.qgemv import QLinear  # noqa: E402

from .test_int4mm import four_bit_weight  # noqa: E402

needs_kernel = pytest.mark.skipif(not qgemv.available(), reason="no AVX-512 VNNI or compiler")


def q4_1_weight(n: int, k: int) -> torch.Tensor:
    """What a GGUF Q4_1 tensor dequantizes to: levels 0..15 (both ends used) times an fp16
    step, plus an fp16 minimum, per group of 32."""
    return to_q4_1(four_bit_weight(n, k))


def to_q4_1(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    weight = weight.view(n, k // 32, 32)
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
    """Any number of rows, fp32 or bf16 activations: within the rounding of int8 activations
    per group of 32 (~0.5% of the product's norm)."""
    for weight in (q4_1_weight(96, 320), torch.randn(80, 128)):
        linear = QLinear(weight)
        x = torch.randn(rows, weight.shape[1]).to(dtype)
        expected = x.float() @ linear.dequantize().T
        got = linear(x)
        assert got.shape == (rows, weight.shape[0]) and got.dtype == torch.float32
        assert float((got - expected).norm() / expected.norm()) < 0.015


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization, in torch: per group of 32, step = max|x| / 127
    (fp32), q = x * (1 / step) rounded half away from zero."""
    groups = x.float().view(x.shape[0], -1, 32)
    step = groups.abs().amax(dim=2) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    scaled = groups * inverse[..., None]
    return torch.sign(scaled) * torch.floor(scaled.abs() + 0.5), step


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_every_row_count_is_the_exact_integer_product(bits: int) -> None:
    """1..16 rows (tiles of 8 and the rest), N not a multiple of 16 (a short last block),
    K a multiple of 32 but not 64: the result is the integer dot products of the weight's
    levels with the int8 activations, scaled as the GGUF's blocks say, to fp32 rounding."""
    n, k = 100, 160
    weight = q4_1_weight(n, k) if bits == 4 else q8_0_weight(n, k)
    linear = QLinear(weight)
    assert linear.bits == bits
    levels, scales, offsets = qgemv.unpack(linear.packed, bits)
    levels, scales, offsets = levels[:n].double(), scales[:n].double(), offsets[:n].double()
    for rows in range(1, qgemv.MAX_ROWS + 1):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        q, step = int8_rows(x)
        dots = torch.einsum("mgi,ngi->mng", q.double(), levels)  # exact integers
        sums = q.double().sum(dim=2)  # (M, G)
        expected = (dots * scales[None] * step.double()[:, None]).sum(dim=2)
        expected += ((step.double() * sums)[:, None] * offsets[None]).sum(dim=2)
        got = linear(x).double()
        assert got.shape == (rows, n)
        torch.testing.assert_close(
            got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )


@needs_kernel
def test_pack_round_trips_and_pads_the_last_block() -> None:
    levels = torch.randint(0, 16, (20, 3, 32), dtype=torch.uint8)
    scales, offsets = torch.rand(20, 3).half(), -torch.rand(20, 3).half()
    packed = qgemv.pack(levels, scales, offsets, 4)
    assert packed.shape == (2, 3, 256 + 64)  # 20 outputs: two blocks of 16
    back = qgemv.unpack(packed, 4)
    assert torch.equal(back[0][:20], levels) and not bool(back[0][20:].any())
    assert torch.equal(back[1][:20], scales) and torch.equal(back[2][:20], offsets)


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
    x = torch.randn(qgemv.MAX_ROWS + 1, 256)
    expected = x @ dual.small.dequantize().T
    for rows in (1, 8, qgemv.MAX_ROWS, qgemv.MAX_ROWS + 1):  # qgemv, then bf16
        got = dual(x[:rows]).float()  # within activation rounding (int8 or bf16)
        assert float((got - expected[:rows]).norm() / expected[:rows].norm()) < 0.015
    if HAS_INT4_KERNEL:  # a one-plane weight keeps torch's planes, should they be faster
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


@needs_kernel
@pytest.mark.skipif(not HAS_INT4_KERNEL, reason="torch lacks the CPU int4 kernel")
def test_routes_send_each_step_size_to_its_path() -> None:
    """What start-up measured decides which of the three a step of r rows takes."""
    dual = DualLinear(q4_1_weight(64, 256))
    assert dual.middle is not None
    x = torch.randn(4, 256)
    try:
        qgemv.set_routes({1: "planes", 2: "bf16"})
        with qgemv.decoding():
            assert torch.equal(dual(x[:1]), dual.middle(x[:1]))
            assert torch.equal(dual(x[:2]), dual.large(x[:2]))
            assert torch.equal(dual(x[:3]), dual.small(x[:3]))  # not listed: the kernel
        assert not qgemv.serves(1) and qgemv.serves(3)
    finally:
        qgemv.set_routes({})
    # Outside decode steps (prefill chunks): the bf16 copy at any size, whatever the routes
    # say, so that a prompt's result does not depend on the rows beside it.
    y = torch.randn(5, 256)
    for rows in (1, 4, 5):
        assert torch.equal(dual(y[:rows]), dual.large(y[:rows]))
    with qgemv.decoding():
        assert torch.equal(dual(y), dual.small(y))


@needs_kernel
@pytest.mark.skipif(not HAS_INT4_KERNEL, reason="torch lacks the CPU int4 kernel")
def test_paths_are_chosen_by_timing_the_models_own_layer(
    tiny_llama_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny Llama with its matrices rounded to Q4_1 levels (so both the kernel and
    torch's planes hold them): every step size gets a path, logged, and routed."""
    shutil.copytree(tiny_llama_dir, tmp_path, dirs_exist_ok=True)
    for file in tmp_path.glob("*.safetensors"):
        state = load_file(file)
        for name, tensor in state.items():
            if tensor.dim() == 2 and tensor.shape[1] % 32 == 0 and tensor.shape[0] % 16 == 0:
                state[name] = to_q4_1(tensor.float()).to(tensor.dtype)
        save_file(state, file, metadata={"format": "pt"})
    runtime = TextGenerationRuntime.load(tmp_path, weights="bf16+int4")
    try:
        # C layers (fused.py): the kernel for every step, untimed
        assert choose_paths(runtime.model) == {} and qgemv.route(1) == "kernel"
        monkeypatch.setattr(fused, "build", lambda model: None)  # a model they cannot take
        with caplog.at_level(logging.INFO, logger="slimserve.runtimes.llm.int4mm"):
            table = choose_paths(runtime.model, repeats=3)
        assert sorted(table) == list(range(1, qgemv.MAX_ROWS + 1))
        assert set(table.values()) <= {"kernel", "planes", "bf16"}
        assert all(qgemv.route(rows) == path for rows, path in table.items())
        assert "few-row matmul paths" in caplog.text and "chosen" in caplog.text
        qgemv.set_routes({1: "planes"})
        monkeypatch.setenv("SLIMSERVE_CHOOSE_PATHS", "0")  # no timing: the kernel everywhere
        assert choose_paths(runtime.model) == {} and qgemv.route(1) == "kernel"
    finally:
        qgemv.set_routes({})


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,hd", [(6, 2, 32), (9, 3, 64), (10, 2, 64), (4, 1, 160)])
def test_rows_attention_reads_each_rows_block_table_and_matches_torch(
    dtype: torch.dtype, heads: int, kv_heads: int, hd: int
) -> None:
    """Three rows of different lengths over scattered blocks (bs 4): each row's new K/V land
    at its slot, and each output is torch's attention over that row's positions. Shapes:
    the query heads of a K/V head in registers (SmolLM2's 3 x 64), in two passes (5), and
    one head at a time (hd 160)."""
    bs = 4
    cache = torch.randn(2, kv_heads, 12, bs, hd).to(dtype)
    tables = torch.tensor([[3, 7, 1], [5, 0, 0], [11, 2, 9]])  # padding: block 0
    positions = torch.tensor([[9], [2], [10]])
    slots = torch.stack([tables[b, p // bs] * bs + p % bs for b, p in enumerate(positions[:, 0])])
    q = torch.randn(3, heads, hd)
    k, v = torch.randn(3, kv_heads, hd).to(dtype), torch.randn(3, kv_heads, hd).to(dtype)
    out = qgemv.attend_rows(q, k, v, cache, slots, tables, positions, 0.3)
    saved = torch.get_num_threads()
    try:  # the (row, K/V head) units shared by two threads, or all on one: the same bits
        for threads in (1, 2):
            torch.set_num_threads(threads)
            again = qgemv.attend_rows(q, k, v, cache, slots, tables, positions, 0.3)
            assert torch.equal(again, out)
    finally:
        torch.set_num_threads(saved)
    flat = cache.view(2, kv_heads, 12 * bs, hd).float()
    for b in range(3):
        assert torch.equal(flat[0, :, int(slots[b])], k[b].float())
        assert torch.equal(flat[1, :, int(slots[b])], v[b].float())
        keys = int(positions[b, 0]) + 1
        at = torch.tensor([int(tables[b, p // bs]) * bs + p % bs for p in range(keys)])
        grouped = q[b].view(kv_heads, heads // kv_heads, hd)
        expected = torch.nn.functional.scaled_dot_product_attention(
            grouped, flat[0][:, at], flat[1][:, at], scale=0.3
        )
        torch.testing.assert_close(out[b], expected.reshape(heads, hd), rtol=1e-4, atol=1e-5)


def paged_expected(
    q: torch.Tensor, flat: torch.Tensor, table: torch.Tensor, keys: int, bs: int
) -> torch.Tensor:
    """torch's attention of one row (H, hd) over positions 0..keys-1 through its block table,
    `flat` the pool (2, Hkv, slots, hd), in fp64: over a thousand keys, torch's own fp32
    attention strays up to ~7e-5 from it here, the kernel ~2e-5 (values of scale 3)."""
    at = table[torch.arange(keys) // bs] * bs + torch.arange(keys) % bs
    kv_heads, hd = flat.shape[1], flat.shape[3]
    grouped = q.double().view(kv_heads, -1, hd)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, flat[0][:, at].double(), flat[1][:, at].double(), scale=0.125
    )
    return out.reshape(q.shape)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_attention_over_long_contexts_of_different_lengths(dtype: torch.dtype) -> None:
    """SmolLM2's shape, rows of 1, 17 (16 keys and one more), 1000 and 1300 keys over
    shuffled blocks of 16: scores are taken 16 keys at a time, so every tail length meets
    torch's attention (in fp64); scores of scale ~9, so a peaked softmax."""
    heads, kv_heads, hd, bs = 9, 3, 64, 16
    lengths = [1, 17, 1000, 1300]
    width = -(-max(lengths) // bs)
    blocks = len(lengths) * width
    cache = (torch.randn(2, kv_heads, blocks, bs, hd) * 3).to(dtype)
    tables = torch.randperm(blocks).view(len(lengths), width)
    positions = torch.tensor(lengths).view(-1, 1) - 1
    last = positions[:, 0]
    slots = tables[torch.arange(len(lengths)), last // bs] * bs + last % bs
    q = torch.randn(len(lengths), heads, hd) * 3
    k, v = torch.randn(len(lengths), kv_heads, hd).to(dtype), torch.randn(4, kv_heads, hd)
    out = qgemv.attend_rows(q, k, v.to(dtype), cache, slots, tables, positions, 0.125)
    flat = cache.view(2, kv_heads, blocks * bs, hd).float()
    for b, keys in enumerate(lengths):
        expected = paged_expected(q[b], flat, tables[b], keys, bs)
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-4, atol=5e-5)


@needs_kernel
def test_one_row_attention_over_a_long_context_matches_torch() -> None:
    """Consecutive slots (no block table), 1500 keys from slot 7, hd 128 and 4 query heads
    a K/V head (the other register shape), then hd 160 (sizes known at run time only)."""
    for heads, hd in ((8, 128), (4, 160)):
        kv_heads, first, keys = 2, 7, 1500
        cache = torch.randn(2, kv_heads, 100, 16, hd)
        q, k, v = torch.randn(heads, hd), torch.randn(kv_heads, hd), torch.randn(kv_heads, hd)
        out = qgemv.attend_one(q, k, v, cache, first, keys, 0.125)
        flat = cache.view(2, kv_heads, 1600, hd)
        table = torch.arange(first, first + keys)  # a "block table" of single positions
        expected = paged_expected(q, flat, table, keys, 1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=5e-5)


@needs_kernel
def test_the_kernels_exponential_is_within_one_ulp_of_exp() -> None:
    """The kernels' vectorized e^x (csrc/qgemv.c, exp16: the softmax's, x <= 0, and silu's)
    against fp64's exp rounded to fp32: at most 1 ulp (as bit patterns, subnormals too),
    exactly 1 at 0, exactly 0 and inf where fp32's e^x rounds to 0 and overflows, NaN kept."""
    lib = qgemv._library()
    assert lib is not None
    lib.qgemv_exp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.qgemv_exp.restype = None
    special = [0.0, -0.0, -1e-30, -87.34, -103.97, -103.98, -200.0, -float("inf")]
    special += [88.72, 88.73, 1e30, float("inf"), float("nan")]
    softmax = -torch.rand(100_000) * 4
    x = torch.cat([torch.linspace(-110, 89, 400_001), softmax, torch.tensor(special)])
    y = torch.empty_like(x)
    lib.qgemv_exp(x.data_ptr(), y.data_ptr(), x.numel() - 3)  # a short last vector too
    lib.qgemv_exp(x[-3:].data_ptr(), y[-3:].data_ptr(), 3)
    expected = torch.exp(x.double()).float()
    ulps = (y.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
    assert int(ulps[:-1].max()) <= 1
    assert y[x == 0].eq(1).all() and y[x < -103.98].eq(0).all() and y[x > 88.73].isinf().all()
    assert y[-1].isnan()


@needs_kernel
@pytest.mark.timeout(120)
def test_two_callers_at_once_each_get_their_own_result() -> None:
    """Two engines of one server (two models) may call the kernel at the same moment: one
    job has the pool, the other runs on its caller's thread; both right, neither hangs."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no pool to share")
    weights = [QLinear(q4_1_weight(n, k)) for n, k in ((1024, 512), (512, 1024), (64, 256))]
    xs = [torch.randn(16, 512), torch.randn(1, 1024), torch.randn(2, 256)]
    expected = [w(x) for w, x in zip(weights, xs, strict=True)]

    def hammer(i: int) -> bool:
        return all(torch.equal(weights[i](xs[i]), expected[i]) for _ in range(1000))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(hammer, range(3)))
    assert results == [True, True, True]
