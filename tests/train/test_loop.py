"""fit(): trains, honours masks and L2, mixed precision with dynamic loss scaling."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.train import Callback, LossScaler, TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP([64, 32, 10])


def test_fit_learns_digits(digits):
    model = _mlp()
    before = accuracy(model, *digits)
    result = fit(model, classification_loss, digits, TrainConfig(epochs=4, lr=3e-3, **QUIET))
    assert before < 0.3
    assert accuracy(model, *digits) > 0.9
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.steps == 4 * math.ceil(len(digits[0]) / 64)
    assert result.world_size == 1


def test_masked_weights_stay_zero_through_training(digits):
    model = _mlp()
    layer = model.net[0]
    mask = (torch.rand_like(layer.weight) > 0.7).float()
    layer.register_buffer("weight_mask", mask)
    with torch.no_grad():
        layer.weight.mul_(mask)
    fit(model, classification_loss, digits, TrainConfig(epochs=1, lr=1e-2, **QUIET))
    assert torch.all(layer.weight[mask == 0] == 0)
    assert torch.all(layer.weight[mask == 1] != 0)


def test_weight_decay_is_l2_on_sgd(digits):
    # A loss with zero gradient leaves only the L2 term: w <- w * (1 - lr * wd) every step.
    model = _mlp()
    w0 = model.net[0].weight.detach().clone()
    config = TrainConfig(
        epochs=1, lr=0.1, weight_decay=0.5, optimizer="sgd", momentum=0.0, batch_size=600, **QUIET
    )
    result = fit(model, lambda m, b: (m(b[0]) * 0).sum(), digits, config)
    expected = w0 * (1 - 0.1 * 0.5) ** result.steps
    torch.testing.assert_close(model.net[0].weight.detach(), expected)


def test_loss_scaler_skips_overflow_halves_and_grows_back():
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = LossScaler(init_scale=1024.0, growth_interval=3)

    param.grad = torch.tensor([1.0, math.inf, 1.0])
    assert scaler.step(opt) is False
    assert torch.equal(param.detach(), torch.ones(3))  # the step was skipped
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1

    for i in range(3):
        param.grad = torch.full((3,), 512.0)  # scaled gradient of 1.0
        assert scaler.step(opt) is True
        assert scaler.scale == (512.0 if i < 2 else 1024.0)
    torch.testing.assert_close(param.detach(), torch.full((3,), 1 - 3 * 0.1))


def test_fp16_fit_skips_an_overflowing_step(digits):
    model = _mlp()
    calls = []

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls.append(1)
        loss = classification_loss(m, batch)
        return loss * math.inf if len(calls) == 1 else loss

    config = TrainConfig(epochs=1, lr=3e-3, mixed_precision="fp16", batch_size=256, **QUIET)
    result = fit(model, loss_fn, digits, config)
    assert result.skipped_steps == 1
    assert result.loss_scale == 2.0**15  # halved once from 2^16, no growth in 8 steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_trains(digits):
    model = _mlp()
    config = TrainConfig(epochs=3, lr=3e-3, mixed_precision="bf16", **QUIET)
    result = fit(model, classification_loss, digits, config)
    assert result.loss_scale is None  # bf16 has fp32's range: no scaling
    assert accuracy(model, *digits) > 0.85


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": -1},
        {"lr": 0},
        {"batch_size": 0},
        {"optimizer": "lion"},
        {"mixed_precision": "fp8"},
    ],
)
def test_bad_config_is_named(kwargs):
    with pytest.raises(InvalidArgument, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_mismatched_tensors_are_refused(digits):
    with pytest.raises(InvalidArgument, match="first"):
        fit(_mlp(), classification_loss, (digits[0], digits[1][:10]), TrainConfig(**QUIET))


def test_a_conv_net_trains_channels_last_and_gets_its_layout_back(digits):
    # fit trains convolutions in channels-last layout (faster on CPU); the steps are the same
    # as a plain loop in the default layout up to summation order, and the layout is restored.
    x, y = digits[0][:256].view(-1, 1, 8, 8), digits[1][:256]

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))

    class Layout(Callback):
        def on_train_start(self, model: nn.Module) -> None:
            seen.append(model[0].weight.is_contiguous(memory_format=torch.channels_last))

    seen: list[bool] = []
    model, plain = net(), net()
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=256, shuffle=False, **QUIET)
    fit(model, classification_loss, (x, y), config, [Layout()])
    assert seen == [True]
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()
    assert model[0].weight.is_contiguous()
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
