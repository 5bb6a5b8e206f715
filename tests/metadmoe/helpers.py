"""Tiny backbones for fast, exact Meta-DMoE tests."""

import torch
from torch import nn

from transferlab.metadmoe import Aggregator, MetaDMoE, MetaDMoEConfig


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> tanh features (D = 8) and a linear head: smooth, so second order is non-trivial."""

    def __init__(self, d_in=6, d=8, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.Tanh(), nn.Linear(d, d))
        self.classifier = nn.Linear(d, classes)

    def features(self, x):
        return self.body(x)

    def head(self, z):
        return self.classifier(z)

    def forward(self, x):
        return self.head(self.features(x))


def make(n_experts=3, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    experts = [TinyNet().to(dtype) for _ in range(n_experts)]
    for e in experts:  # non-trivial BN statistics so eval mode differs from batch statistics
        e.body[1].running_mean.normal_()
        e.body[1].running_var.uniform_(0.5, 2)
    agg = Aggregator(8, heads=2, num_classes=3, zero_init=False, dropout=0.0).to(dtype)
    student = TinyNet().to(dtype)
    student.body[1].running_mean.normal_()
    config = MetaDMoEConfig(**{"inner_lr": 0.1, **cfg})
    return MetaDMoE(experts, agg, student, config, input_shape=(6,))


def batch(n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
