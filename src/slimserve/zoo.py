"""Small torch model classes used by the demo, the tests, the benchmarks and `optimize`.

Name them in model.yaml as `model_class: slimserve.zoo:MLP` with `model_args`. Importing this
module imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected ReLU network; `sizes` = [in, hidden..., out], e.g. [784, 1024, 1024, 10].

    Input (B, sizes[0]) float32 -> logits (B, sizes[-1]).
    """

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least [in, out] sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.flatten(1))
        return out

    def pipeline_blocks(self) -> list[nn.Module]:
        """forward as a sequence of blocks (what pipeline-parallel training cuts into stages)."""
        return [nn.Flatten(1), *self.net]


class _MnistConvNet(nn.Module):
    """`features` then `classifier`, on 28x28 images given as (B, 1, 28, 28) or (B, 784)."""

    features: nn.Sequential
    classifier: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(_images(x)))
        return out

    def pipeline_blocks(self) -> list[nn.Module]:
        """forward as a sequence of blocks (what pipeline-parallel training cuts into stages)."""
        return [_Images(), *self.features, *self.classifier]


class LeNet5(_MnistConvNet):
    """LeNet-5 for 28x28 single-channel images: input (B, 1, 28, 28) or (B, 784) -> (B, 10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),  # (B, 6, 28, 28)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5),  # (B, 16, 10, 10)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )


class CaffeLeNet(_MnistConvNet):
    """LeNet-5 as in Caffe's MNIST example and Han et al. 2015/2016 (20-50-500, 431k weights).

    conv 5x5 (1->20) -> pool -> conv 5x5 (20->50) -> pool -> fc 800->500 -> fc 500->10, no
    padding. Input (B, 1, 28, 28) or (B, 784) -> logits (B, num_classes).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5),  # (B, 20, 24, 24)
            nn.MaxPool2d(2),  # (B, 20, 12, 12)
            nn.Conv2d(20, 50, 5),  # (B, 50, 8, 8)
            nn.MaxPool2d(2),  # (B, 50, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )


def _images(x: torch.Tensor) -> torch.Tensor:
    """(B, 784) flat pixel rows as (B, 1, 28, 28) images; images as they are."""
    return x.view(-1, 1, 28, 28) if x.dim() == 2 else x


class _Images(nn.Module):
    """`_images` as a block, the first of a LeNet's pipeline blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _images(x)
