"""Fixtures shared by the native int8 tests."""

from __future__ import annotations

import copy

import pytest
import torch

from slimserve.optimize.quantize import StaticInt8, quantize_
from slimserve.zoo import LeNet5


@pytest.fixture(scope="module")
def lenet():
    """(float LeNet-5, its native static int8 copy, calibration images)."""
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.rand(64, 1, 28, 28)
    return model, quantize_(copy.deepcopy(model), StaticInt8(), data=x), x
