"""Benchmark `metadmoe-adapt`: one test-time adaptation vs one student forward + backward on the same batch.

`adapt` runs N frozen expert forwards, the aggregator and one student forward + backward, so by FLOPs
it is 1 + N * (forward / forward-backward) student passes: for the experiment's 5 small CNNs
(torch.utils.flop_counter) 714.5 + 21.4 + 414.3 = 1150 MFLOP vs 414.5 MFLOP, a floor of 2.77x at
equal FLOP rate. It meets the 3x target against the student pass as users run it (NCHW) because the
teacher and the inner step run channels-last on CPU (layout.py), where NCHW pooling/convolution is
slow. So that this does not flatter the ratio, the second line compares against the student pass
run channels-last too (the fastest student pass we know); it sits right at the FLOP floor. The third
line isolates our overhead (same work as plain module calls, same layout); the fourth shows `adapt`
with the layout switched off (plain NCHW execution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from ..nn import SmallCNN
from .aggregator import Aggregator
from .layout import to_channels_last
from .model import MetaDMoE


def _time_pair(candidate: Callable, baseline: Callable, device: torch.device, rounds: int = 5, warmup: int = 3,
               repeat: int = 9) -> tuple[float, float]:
    # one CPU thread: process CPU time (see core.bench.time_fn), since wall time here measured the neighbours
    return time_pair(candidate, baseline, rounds=rounds, warmup=warmup, repeat=repeat, device=device, clock="auto")


@register_benchmark("metadmoe-adapt", "Meta-DMoE adapt() on 64 images vs one student forward+backward (target <= 3x)")
def bench_adapt(device: str) -> list[Comparison]:
    torch.manual_seed(0)
    dev = torch.device(device)
    cnn = lambda: SmallCNN(10, width=16, hidden=64).to(dev).eval()  # noqa: E731  (the experiment's CNN)
    experts, agg = [cnn().requires_grad_(False) for _ in range(5)], Aggregator(64, heads=4).to(dev).eval()
    m = MetaDMoE(experts, agg, cnn())
    m_nchw = MetaDMoE(experts, agg, m.student, channels_last=False)
    x = torch.rand(64, 1, 28, 28, device=dev)
    xl = to_channels_last(x) if m.layout.wants(x) else x  # the layout adapt runs in
    y = torch.randint(0, 10, (64,), device=dev)
    s = m.student

    def fwd_bwd(inp=x):  # the baseline, untouched: the student's pass as a user runs it
        s.zero_grad(set_to_none=True)
        F.cross_entropy(s(inp), y).backward()

    def same_work():  # expert forwards + aggregator + student forward/backward as plain calls, adapt's layout
        with torch.no_grad():
            t = m.aggregator.features(torch.stack([e.features(xl) for e in m.experts], 1))
        s.zero_grad(set_to_none=True)
        F.mse_loss(s.features(xl), t).backward()

    adapt, base = _time_pair(lambda: m.adapt(x), fwd_bwd, dev)
    adapt_l, base_l = _time_pair(lambda: m.adapt(x), lambda: fwd_bwd(xl), dev)
    adapt_w, work = _time_pair(lambda: m.adapt(x), same_work, dev)
    adapt_n, base_n = _time_pair(lambda: m_nchw.adapt(x), fwd_bwd, dev, rounds=3)
    return [
        Comparison("metadmoe-adapt", "adapt(64 imgs, 5 experts)", "student fwd+bwd (64 imgs)", adapt, base,
                   target=3.0, mode="ratio"),
        Comparison("metadmoe-adapt-vs-cl", "adapt(64 imgs, 5 experts)", "student fwd+bwd, channels-last", adapt_l,
                   base_l, mode="ratio", note="layout-matched baseline; FLOP floor 1150/414.5 MFLOP = 2.77x"),
        Comparison("metadmoe-adapt-overhead", "adapt(64 imgs, 5 experts)", "same work as plain calls", adapt_w, work,
                   target=1.3, mode="ratio", note="overhead of functional_call / parameter aliases"),
        Comparison("metadmoe-adapt-nchw", "adapt, channels_last=False", "student fwd+bwd (64 imgs)", adapt_n, base_n,
                   mode="ratio", note="without the channels-last layout (plain NCHW)"),
    ]
