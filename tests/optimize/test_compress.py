"""Deep Compression: k-means sharing, centroid fine-tuning, the .dcz format, Huffman."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from slimserve.errors import InvalidArgument
from slimserve.optimize.compress import (
    MAGIC,
    WeightSharing,
    compressed_size,
    finetune_centroids,
    kmeans_codes,
    load_compressed,
    read_header,
    relative_entries,
    save_compressed,
    share_weights_,
    unique_values,
)
from slimserve.optimize.prune import MagnitudePruning, make_permanent, prune_, sparsity
from slimserve.runtimes import huffman
from slimserve.train import TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP, LeNet5

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


@pytest.fixture(scope="module")
def pruned(digits) -> MLP:
    """A digits MLP, 85% pruned and fine-tuned."""
    torch.manual_seed(0)
    model = MLP([64, 64, 32, 10])
    fit(model, classification_loss, digits, TrainConfig(epochs=6, lr=3e-3, **QUIET))
    prune_(model, MagnitudePruning(amount=0.85))
    fit(model, classification_loss, digits, TrainConfig(epochs=3, lr=1e-3, **QUIET))
    return model


@pytest.fixture
def shared(pruned) -> MLP:
    model = copy.deepcopy(pruned)
    share_weights_(model, WeightSharing(bits=4))
    return model


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("_mask", "_codes"))}


def test_kmeans_shares_values_and_keeps_zeros():
    torch.manual_seed(0)
    w = torch.randn(50, 40) * (torch.rand(50, 40) > 0.5)
    codebook, codes = kmeans_codes(w, bits=3)
    assert codebook[0] == 0 and codes.dtype == torch.uint8
    assert torch.equal(codes == 0, w == 0)  # exactly the zeros get code 0
    assert int(codes.max()) <= 7
    shared = codebook[codes.long()]
    # Lloyd's fixed point: every weight sits at its nearest centroid
    dist = (w[w != 0, None] - codebook[None, 1:]).abs()
    torch.testing.assert_close(dist.min(1).values, (w - shared)[w != 0].abs())


def test_sharing_keeps_accuracy_and_finetuning_keeps_sharing(shared, pruned, digits):
    codes = {
        n: m.weight_codes.clone() for n, m in shared.named_modules() if hasattr(m, "weight_codes")
    }
    assert all(v <= 15 for v in unique_values(shared).values())
    assert accuracy(shared, *digits) > accuracy(pruned, *digits) - 0.05
    before = shared.net[0].weight.detach().clone()
    finetune_centroids(shared, digits, TrainConfig(epochs=2, lr=1e-3, **QUIET))
    assert not torch.equal(before, shared.net[0].weight)  # the centroids moved
    for name, m in shared.named_modules():
        if name in codes:
            assert torch.equal(m.weight_codes, codes[name])
            for c in codes[name].unique():  # each cluster still holds one value
                assert m.weight[codes[name] == c].unique().numel() == 1
    assert sparsity(shared) == pytest.approx(sparsity(pruned))
    assert accuracy(shared, *digits) > accuracy(pruned, *digits) - 0.03


def test_round_trip_is_bit_exact(shared, tmp_path, digits):
    path = tmp_path / "mlp.dcz"
    stats = save_compressed(shared, path, meta={"model": "digits-mlp"})
    assert stats.stored_bytes == path.stat().st_size
    state = load_compressed(path)
    expected = _plain_state(shared)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    fresh = MLP([64, 64, 32, 10])
    fresh.load_state_dict(state)
    assert torch.equal(fresh(digits[0]), shared(digits[0]))
    sparse = load_compressed(path, sparse=True)
    assert sparse["net.0.weight"].is_sparse
    assert torch.equal(sparse["net.0.weight"].to_dense(), expected["net.0.weight"])
    assert read_header(path)["meta"] == {"model": "digits-mlp"}


def test_stored_size_counts_everything_and_shrinks(shared):
    stats = compressed_size(shared)
    assert stats.dense_bytes == sum(p.numel() * 4 for p in shared.parameters())
    parts = stats.tensors["net.0.weight"]
    assert parts.codebook_bytes == 16 * 4  # 2^4 float32 shared values
    assert (
        parts.stored_bytes
        == parts.codebook_bytes + (parts.code_bits + 7) // 8 + (parts.gap_bits + 7) // 8
    )
    assert parts.nonzero == int((shared.net[0].weight != 0).sum())
    assert stats.stored_bytes > sum(t.stored_bytes for t in stats.tensors.values())  # + header
    assert stats.ratio > 8  # 85% zeros, 4-bit codes: ~9x with the header and biases


def test_unshared_and_conv_models_round_trip(tmp_path):
    torch.manual_seed(0)
    net = LeNet5()
    prune_(net, MagnitudePruning(amount=0.9))
    make_permanent(net)
    plain = tmp_path / "plain.dcz"
    save_compressed(net, plain)  # nothing shared: every tensor raw
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in load_compressed(plain).items())
    share_weights_(net)  # 8 bits for conv, 5 for linear
    path = tmp_path / "lenet.dcz"
    save_compressed(net, path)
    entries = {e["name"]: e for e in read_header(path)["tensors"]}
    assert entries["features.0.weight"]["kind"] == "shared"
    assert entries["features.0.bias"]["kind"] == "raw"
    assert entries["classifier.1.weight"]["bits"] <= 5
    state = load_compressed(path)
    for name, tensor in _plain_state(net).items():
        assert torch.equal(state[name], tensor), name


def test_relative_indices_insert_filler_zeros():
    codes = np.zeros(50, dtype=np.int64)
    codes[40], codes[46] = 3, 1
    gaps, stored = relative_entries(codes, gap_bits=3)  # largest gap: 7
    assert gaps.tolist() == [7, 7, 7, 7, 7, 0, 5]
    assert stored.tolist() == [0, 0, 0, 0, 0, 3, 1]
    positions = np.cumsum(gaps + 1) - 1
    assert positions[-2:].tolist() == [40, 46]


@pytest.mark.parametrize("n, alphabet", [(0, 4), (1, 4), (7, 1), (5000, 32), (20000, 256)])
def test_huffman_round_trip_and_beats_fixed_width(n, alphabet):
    rng = np.random.default_rng(n)
    symbols = rng.zipf(1.6, size=n) % alphabet
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, nbits = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, nbits, n, lengths), symbols)
    assert nbits <= n * max(1, (alphabet - 1).bit_length())
    assert lengths.max(initial=0) <= huffman.MAX_LENGTH


def test_huffman_lengths_are_capped():
    freqs = np.array([2**i for i in range(30)])  # Fibonacci-like: unlimited depth would be 29
    lengths = huffman.code_lengths(freqs)
    assert lengths.max() <= huffman.MAX_LENGTH
    assert sum(2.0**-lengths) <= 1.0  # still a prefix code (Kraft)


def test_corrupt_files_are_refused(shared, tmp_path):
    good = tmp_path / "m.dcz"
    save_compressed(shared, good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(b"\x80\x04" + raw[2:])  # a pickle protocol header, say
    with pytest.raises(InvalidArgument, match="magic"):
        load_compressed(bad)
    bad.write_bytes(raw[:8] + struct.pack("<Q", 1 << 40) + raw[16:])
    with pytest.raises(InvalidArgument, match="truncated"):
        load_compressed(bad)
    (size,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16 : 16 + size])
    header["tensors"][0]["codebook"]["offset"] = 10**9
    head = json.dumps(header).encode()
    bad.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + raw[16 + size :])
    with pytest.raises(InvalidArgument, match="corrupt"):
        load_compressed(bad)


@pytest.mark.parametrize("bits", [0, 9])
def test_impossible_bit_widths_are_refused(bits):
    with pytest.raises(InvalidArgument, match="bits"):
        WeightSharing(bits=bits)
