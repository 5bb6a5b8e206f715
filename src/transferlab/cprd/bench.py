"""Benchmark `cprd-loss`: InfoNCE + CPRD (both directions) vs InfoNCE alone, forward + backward.

Batch 512, K = 16, embedding dim 256; the teacher scores are a precomputed matrix, so the ratio
measures the loss itself (mining, gather, sort, suffix logsumexp), not a teacher's forward pass.
Target: at most 1.5x InfoNCE alone (issue 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from .model import CPRDLoss, InfoNCELoss


def _setup(device: str, n: int = 512, dim: int = 256):
    g = torch.Generator().manual_seed(0)
    zi = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    zt = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    teacher = torch.rand(n, n, generator=g).to(device)
    pos = torch.eye(n, dtype=torch.bool, device=device)
    return zi, zt, teacher, pos


@register_benchmark("cprd-loss", "InfoNCE + CPRD (batch 512, K=16, both directions) fwd+bwd vs InfoNCE alone")
def bench_cprd_loss(device: str) -> list[Comparison]:
    zi, zt, teacher, pos = _setup(device)
    cprd, nce = CPRDLoss(k=16, weight=1.0), InfoNCELoss()
    tau = torch.tensor(0.07, device=device)

    def step(loss_fn):
        def run():
            sim = F.normalize(zi, dim=1) @ F.normalize(zt, dim=1).t()
            loss_fn(sim, pos, teacher, tau)["loss"].backward()
            zi.grad = zt.grad = None
        return run

    c, b = time_pair(step(cprd), step(nce), device=device, repeat=9)
    return [Comparison("cprd-loss fwd+bwd (B=512, K=16)", "InfoNCE + CPRD", "InfoNCE", c, b, target=1.5,
                       mode="ratio")]
