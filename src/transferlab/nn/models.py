"""Small models for 28x28 images. Each exposes `features(x)` and `head(z)` so methods can reuse them."""

from __future__ import annotations

import torch
from torch import nn


class FeatureHead(nn.Module):
    """A `body` that maps inputs to features and a linear `classifier` on top.

    Methods that work on representations (Meta-DMoE's experts and student, linear probing) call
    `features(x)` and `head(z)`; `forward` is their composition.
    """

    body: nn.Module
    classifier: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(FeatureHead):
    """Two conv blocks + a hidden layer: ~100k parameters, ~90% on Fashion-MNIST."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 128,
                 batchnorm: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), norm(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden


class MLP(FeatureHead):
    """Fully connected net on flattened inputs; `bias=False` gives GPM's PMNIST network."""

    def __init__(self, in_features: int = 784, hidden=(100, 100), num_classes: int = 10, bias: bool = True):
        super().__init__()
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h, bias=bias), nn.ReLU()]
            d = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes, bias=bias)
        self.feature_dim = d
