"""Benchmark `metadmoe-adapt`: one test-time adaptation vs one student forward + backward on the same batch.

`adapt` must run N frozen expert forwards, the aggregator and one student forward + backward, so its
floor is about 1 + N * (forward / forward-backward) student passes; the target 3x holds for the
experiment's 5 small-CNN experts. The second line isolates our overhead: `adapt` against the same
work done by plain module calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from ..nn import SmallCNN
from .aggregator import Aggregator
from .model import MetaDMoE


@register_benchmark("metadmoe-adapt", "Meta-DMoE adapt() on 64 images vs one student forward+backward (target <= 3x)")
def bench_adapt(device: str) -> list[Comparison]:
    torch.manual_seed(0)
    dev = torch.device(device)
    cnn = lambda: SmallCNN(10, width=16, hidden=64).to(dev).eval()  # noqa: E731  (the experiment's CNN)
    m = MetaDMoE([cnn() for _ in range(5)], Aggregator(64, heads=4).to(dev).eval(), cnn())
    x = torch.rand(64, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    s = m.student

    def fwd_bwd():
        s.zero_grad(set_to_none=True)
        F.cross_entropy(s(x), y).backward()

    def same_work():  # expert forwards + aggregator + student forward/backward without the functional machinery
        with torch.no_grad():
            t = m.aggregator.features(torch.stack([e.features(x) for e in m.experts], 1))
        s.zero_grad(set_to_none=True)
        F.mse_loss(s.features(x), t).backward()

    kw = {"device": dev, "warmup": 3, "repeat": 9}
    adapt, base = time_pair(lambda: m.adapt(x), fwd_bwd, **kw)
    adapt2, work = time_pair(lambda: m.adapt(x), same_work, **kw)
    return [
        Comparison("metadmoe-adapt", "adapt(64 imgs, 5 experts)", "student fwd+bwd (64 imgs)", adapt, base,
                   target=3.0, mode="ratio"),
        Comparison("metadmoe-adapt-overhead", "adapt(64 imgs, 5 experts)", "same work as plain calls", adapt2, work,
                   target=1.3, mode="ratio", note="overhead of functional_call / parameter copies"),
    ]
