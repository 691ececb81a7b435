"""Pruning: magnitude (layer, global, Han threshold), iterative, structured, sensitivity."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.prune import (
    MagnitudePruning,
    StructuredPruning,
    count_nonzero,
    layer_sparsity,
    make_permanent,
    prune_,
    prune_iteratively,
    schedule_fraction,
    sensitivity,
    sparsity,
)
from slimserve.train import TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP, LeNet5

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained(digits) -> MLP:
    torch.manual_seed(0)
    model = MLP([64, 64, 32, 10])
    fit(model, classification_loss, digits, TrainConfig(epochs=6, lr=3e-3, **QUIET))
    return model


@pytest.fixture
def model(trained) -> MLP:
    return copy.deepcopy(trained)


def test_layer_scope_prunes_each_layer_to_the_amount(model):
    prune_(model, MagnitudePruning(amount=0.75))
    for name, value in layer_sparsity(model).items():
        assert value == pytest.approx(0.75, abs=1e-3), name


def test_layer_scope_removes_the_smallest_weights(model):
    original = model.net[0].weight.detach().abs().clone()
    prune_(model, MagnitudePruning(amount=0.5))
    kept = model.net[0].weight != 0
    assert original[~kept].max() <= original[kept].min()


def test_global_scope_uses_one_threshold(model):
    before = {
        n: m.weight.detach().abs().clone() for n, m in model.named_modules() if hasattr(m, "weight")
    }
    prune_(model, MagnitudePruning(amount=0.8, scope="global"))
    assert sparsity(model) == pytest.approx(0.8, abs=1e-4)
    kept_min = min(before[n][m.weight != 0].min() for n, m in model.named_modules() if n in before)
    cut_max = max(before[n][m.weight == 0].max() for n, m in model.named_modules() if n in before)
    assert cut_max <= kept_min
    per_layer = layer_sparsity(model)
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # layers differ


def test_quality_threshold_is_a_multiple_of_each_layers_std(model):
    weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    prune_(model, MagnitudePruning(quality=0.8))
    for name, m in model.named_modules():
        if name in weights:
            threshold = 0.8 * weights[name].std()
            assert torch.equal(m.weight != 0, weights[name].abs() > threshold)


def test_finetuning_keeps_pruned_weights_zero_and_recovers(model, digits):
    prune_(model, MagnitudePruning(amount=0.85, scope="global"))
    zeros = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    dropped = accuracy(model, *digits)
    fit(model, classification_loss, digits, TrainConfig(epochs=3, lr=1e-3, **QUIET))
    for name, m in model.named_modules():
        if name in zeros:
            assert torch.all(m.weight[zeros[name]] == 0)
    assert accuracy(model, *digits) > max(dropped, 0.9)


def test_pruning_again_keeps_earlier_zeros(model):
    prune_(model, MagnitudePruning(amount=0.5))
    first = model.net[0].weight == 0
    prune_(model, MagnitudePruning(amount=0.8))
    second = model.net[0].weight == 0
    assert torch.all(second[first])
    assert layer_sparsity(model)["net.0"] == pytest.approx(0.8, abs=1e-3)


def test_make_permanent_leaves_a_plain_state_dict(model, trained):
    prune_(model, MagnitudePruning(amount=0.6))
    assert any(k.endswith("weight_mask") for k in model.state_dict())
    make_permanent(model)
    fresh = MLP([64, 64, 32, 10])
    fresh.load_state_dict(model.state_dict())  # strict: no extra keys left
    assert sparsity(fresh) == pytest.approx(0.6, abs=1e-3)
    nonzero, total = count_nonzero(fresh)
    assert nonzero < total == sum(p.numel() for p in trained.parameters())


def test_iterative_pruning_follows_the_schedule(model, digits):
    train = TrainConfig(epochs=2, lr=2e-3, weight_decay=1e-4, **QUIET)
    reports = prune_iteratively(
        model,
        MagnitudePruning(amount=0.85, scope="global"),
        digits,
        train,
        rounds=3,
        metric=lambda m: accuracy(m, *digits),
    )
    targets = [r.target for r in reports]
    assert targets == pytest.approx([0.85 * schedule_fraction(r, 3) for r in (1, 2, 3)])
    assert targets[0] > 0.85 / 3  # cubic: the biggest step first
    assert [r.sparsity for r in reports] == pytest.approx(targets, abs=1e-3)
    assert reports[-1].metric > 0.9


@pytest.mark.parametrize("amount", [1.5, -0.1, 1.0, float("nan")])
def test_impossible_amounts_are_refused(amount):
    with pytest.raises(InvalidArgument, match="amount"):
        MagnitudePruning(amount=amount)
    with pytest.raises(InvalidArgument, match="amount"):
        StructuredPruning(amount=amount)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"amount": 0.5, "quality": 1.0}, "exactly one"),
        ({"amount": 0.5, "scope": "model"}, "scope"),
        ({"quality": -1.0}, "quality"),
        ({"amount": 0.5, "layer_amounts": {"net.0": 2.0}}, "net.0"),
    ],
)
def test_bad_magnitude_configs_are_named(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        MagnitudePruning(**kwargs)


def test_unknown_layer_names_and_unprunable_layers_are_named(model):
    with pytest.raises(InvalidArgument, match=r"net.9"):
        prune_(model, MagnitudePruning(amount=0.5, layer_amounts={"net.9": 0.5}))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(InvalidArgument, match="BatchNorm1d"):
        prune_(bn, MagnitudePruning(amount=0.5), filter_fn=lambda m, n: True)
    with pytest.raises(InvalidArgument, match="no layer"):
        prune_(nn.Sequential(nn.ReLU()), MagnitudePruning(amount=0.5))


def _kill_neurons(linear: nn.Linear, idx: list[int]) -> None:
    with torch.no_grad():
        linear.weight[idx] = 0
        linear.bias[idx] = 0


def test_structured_mlp_removes_dead_neurons_exactly(model, digits):
    # Neurons with zero weights and bias output relu(0) = 0: removing them changes nothing.
    _kill_neurons(model.net[0], list(range(0, 64, 2)))  # 32 of 64
    _kill_neurons(model.net[2], list(range(0, 32, 4)))  # 8 of 32
    reference = model(digits[0])
    prune_(model, StructuredPruning(amount=0.25, layer_amounts={"net.0": 0.5}))
    assert [m.weight.shape for m in model.net if isinstance(m, nn.Linear)] == [
        (32, 64),
        (24, 32),
        (10, 24),
    ]
    assert model.net[2].in_features == 32 and model.net[4].in_features == 24
    torch.testing.assert_close(model(digits[0]), reference)


def test_structured_lenet_removes_conv_channels_exactly():
    torch.manual_seed(0)
    net = LeNet5()
    with torch.no_grad():
        for conv, dead in ((net.features[0], [1, 3, 5]), (net.features[3], list(range(8)))):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
    x = torch.randn(4, 1, 28, 28)
    reference = net(x)
    only_convs = lambda m, name: isinstance(m, nn.Conv2d)  # noqa: E731
    prune_(net, StructuredPruning(amount=0.5), only_convs, example_input=x)
    assert net.features[0].weight.shape == (3, 1, 5, 5)
    assert net.features[3].weight.shape == (8, 3, 5, 5)
    assert net.classifier[1].weight.shape == (120, 8 * 5 * 5)  # Flatten: 25 inputs per channel
    torch.testing.assert_close(net(x), reference)


def test_structured_taylor_gives_a_smaller_model_that_finetunes(model, digits):
    with pytest.raises(InvalidArgument, match="data"):
        prune_(copy.deepcopy(model), StructuredPruning(0.5, importance="taylor"))
    params = sum(p.numel() for p in model.parameters())
    prune_(model, StructuredPruning(0.5, importance="taylor"), data=digits)
    assert sum(p.numel() for p in model.parameters()) < params * 0.5
    fit(model, classification_loss, digits, TrainConfig(epochs=3, lr=2e-3, **QUIET))
    assert accuracy(model, *digits) > 0.9


class _Residual(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = torch.relu if functional else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc3(self.fc2(h) + h)  # h is read twice: fc1's width is tied to fc2's


@pytest.mark.parametrize("functional, match", [(True, "cannot remove"), (False, "residual")])
def test_structured_refuses_a_residual_and_leaves_the_model(functional, match):
    res = _Residual(functional)
    shapes = [p.shape for p in res.parameters()]
    with pytest.raises(InvalidArgument, match=match):
        prune_(res, StructuredPruning(0.5), lambda m, n: n == "fc1", example_input=torch.ones(2, 8))
    assert [p.shape for p in res.parameters()] == shapes


def test_structured_refuses_the_output_layer(model):
    with pytest.raises(InvalidArgument, match=r"net.4"):  # the output layer
        prune_(model, StructuredPruning(0.5), lambda m, n: n == "net.4")
    with pytest.raises(InvalidArgument, match="example input"):
        prune_(LeNet5(), StructuredPruning(0.5))


def test_sensitivity_measures_each_layer_on_a_copy(model, digits):
    weights = copy.deepcopy(model.state_dict())
    result = sensitivity(model, digits, amounts=(0.3, 0.95))
    assert set(result.layers) == {"net.0", "net.2", "net.4"}
    assert result.baseline == pytest.approx(accuracy(model, *digits))
    for by_amount in result.layers.values():
        assert by_amount[0.95] < by_amount[0.3] <= result.baseline + 0.01
    chosen = result.choose(max_drop=0.02)
    assert all(a in (0.0, 0.3, 0.95) for a in chosen.values())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    structured = sensitivity(model, digits, amounts=(0.5,), structured=True)
    assert set(structured.layers) == {"net.0", "net.2"}  # the output layer keeps its size
