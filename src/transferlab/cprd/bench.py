"""Benchmark `cprd-loss`: InfoNCE + CPRD (both directions) vs InfoNCE alone, forward + backward.

Batch 512, K = 16, embedding dim 256; the teacher scores are a precomputed matrix, so the ratio
measures the loss itself (mining, gather, sort, suffix logsumexp), not a teacher's forward pass.
Target: at most 1.5x InfoNCE alone. On CPU the label says whether CPRD's C kernels
(cprd/kernels.py) ran or the PyTorch path did (no C compiler, or TRANSFERLAB_NATIVE=0).

Why several batches in rotation: a training step never sees the same batch twice in a row. Timing
one repeated batch lets the CPU's branch predictor learn `topk`/`sort`'s comparisons, which makes
comparison-heavy code (CPRD's mining) look ~10% cheaper than it is. Both losses see the same batches.

Timing: candidate and baseline alternate in blocks of 5 steps (40 blocks each, median), read on the
harness's "auto" clock: process CPU time when torch runs one thread on the CPU (on a shared machine
wall time also measures the neighbours' load: wall ratios 0.93-1.86 were seen for CPU-time ratios
1.31-1.45), wall time otherwise. With two or more threads CPU time would also count the idle OpenMP
worker spinning through CPRD's small single-threaded ops, which is not time the step takes.
Why blocks of several steps: at two threads the single-step CPU-time ratio of five runs on the idle
machine spread over 1.38-1.53, the wall ratio of 5-step blocks over 1.46-1.49.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from . import kernels
from .model import CPRDLoss, InfoNCELoss


def _setup(device: str, n: int = 512, dim: int = 256, batches: int = 4):
    """`batches` independent (image emb, text emb, teacher scores) triples and the positive mask."""
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        zi = torch.randn(n, dim, generator=g).to(device).requires_grad_()
        zt = torch.randn(n, dim, generator=g).to(device).requires_grad_()
        data.append((zi, zt, torch.rand(n, n, generator=g).to(device)))
    return data, torch.eye(n, dtype=torch.bool, device=device)


def _steps(device: str):
    data, pos = _setup(device)
    tau = torch.tensor(0.07, device=device)
    cprd, nce = CPRDLoss(k=16, weight=1.0), InfoNCELoss()

    def step(loss_fn):
        i = [0]

        def run():
            zi, zt, teacher = data[i[0] % len(data)]
            i[0] += 1
            sim = F.normalize(zi, dim=1) @ F.normalize(zt, dim=1).t()
            loss_fn(sim, pos, teacher, tau)["loss"].backward()
            zi.grad = zt.grad = None
        return run

    return step(cprd), step(nce)


@register_benchmark("cprd-loss", "InfoNCE + CPRD (batch 512, K=16, both directions) fwd+bwd vs InfoNCE alone")
def bench_cprd_loss(device: str) -> list[Comparison]:
    cand, base = _steps(device)

    def block(step):
        def run():
            for _ in range(5):
                step()
        return run

    c, b = time_pair(block(cand), block(base), device=device, rounds=40, warmup=1, repeat=1, clock="auto")
    on_cpu = torch.device(device).type == "cpu"
    threads = torch.get_num_threads()
    clock = "wall, CUDA" if not on_cpu else "CPU time, 1 thread" if threads == 1 else f"wall, {threads} threads"
    # the CPU result depends on whether the C kernels were built (see cprd/kernels.py)
    clock += "" if not on_cpu else ", C kernels" if kernels.available() else ", PyTorch path (no C kernels)"
    return [Comparison(f"cprd-loss fwd+bwd (B=512, K=16), {clock}",
                       "InfoNCE + CPRD", "InfoNCE", c / 5, b / 5, target=1.5, mode="ratio",
                       note="medians of 40 alternating blocks of 5 steps")]
