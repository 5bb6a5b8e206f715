"""`kind-layer`: cost of a KindLinear against nn.Linear at DiT-XL width (1152), 256 tokens x batch 32.

Targets: training forward+backward <= 1.3x nn.Linear, with one class, 8 classes or every sample of
another class in the batch; merged inference forward <= 1.05x.
With one routing for the batch the layer materialises W = U diag(s) V^T once (in*out*r multiply-adds)
and applies it as one GEMM, instead of two GEMMs in factored form (2x the FLOPs at r = width). A
mixed-class batch applies the learngenes as one product for every sample and gathers each sample's
own k active tailors into two batched matmuls: FLOPs (1 + n_g/tokens + 2k/width) x nn.Linear.

Times are CPU time of the process on a one-thread CPU run (`clock="auto"`: neighbours' time slices on
a shared machine do not count), the median of interleaved rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from .gate import gate_table
from .layer import GateContext, KindLinear


def _layers(width: int, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(width, width).to(device)
    kind = KindLinear(width, width, width // 2, width // 2).to(device)
    return lin, kind


def _route(kind: KindLinear, labels: torch.Tensor, num_classes: int, k: int) -> None:
    table = gate_table(num_classes, kind.n_tailor, k).to(labels.device)
    masks, inverse = torch.unique(table[labels], dim=0, return_inverse=True)
    ctx = GateContext()
    ctx.set(masks, inverse)
    kind.ctx = ctx


@register_benchmark("kind-layer", "KindLinear vs nn.Linear at width 1152, 256 tokens x batch 32: "
                                  "train fwd+bwd with 1, 8 and 32 classes per batch (<= 1.3x) and merged "
                                  "inference forward (<= 1.05x)")
def kind_layer(device: str) -> list[Comparison]:
    cuda = torch.device(device).type == "cuda"
    width, tokens, batch = 1152, 256, 32
    kw = {"warmup": 3, "repeat": 10, "rounds": 3} if cuda else {"warmup": 1, "repeat": 3, "rounds": 3,
                                                                "clock": "auto"}
    # inference calls are short: more interleaved rounds make their ratio stable
    kw_inf = {**kw, "rounds": 5, "repeat": 10} if cuda else {**kw, "rounds": 9, "repeat": 5}
    lin, kind = _layers(width, device)
    x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
    gy = torch.randn(batch, tokens, width, device=device)

    def train_step(layer):
        def f():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(gy)
        return f

    rows = []
    per_class = width // 2 // 8
    # one class per batch (every tailor of that class on; the paper's per-class training view)
    _route(kind, torch.zeros(batch, dtype=torch.long, device=device), 8, per_class)
    c, b = time_pair(train_step(kind), train_step(lin), device=device, **kw)
    rows.append(Comparison("train fwd+bwd, 1 class/batch", "KindLinear", "nn.Linear", c, b, 1.3, "ratio",
                           note=f"learngenes + {per_class} of 576 tailors"))
    # all components on (no gate context): full rank 1152
    kind.ctx = None
    c, b = time_pair(train_step(kind), train_step(lin), device=device, **kw)
    rows.append(Comparison("train fwd+bwd, all 1152 components", "KindLinear", "nn.Linear", c, b, 1.3, "ratio"))
    # a mixed batch of 8 classes, 72 tailors each (how a class-conditional DiT is trained)
    _route(kind, torch.arange(batch, device=device) % 8, 8, per_class)
    c, b = time_pair(train_step(kind), train_step(lin), device=device, **kw)
    rows.append(Comparison("train fwd+bwd, 8 classes/batch", "KindLinear", "nn.Linear", c, b, 1.3, "ratio",
                           note=f"{per_class} tailors per class"))
    # every sample another class: a 32-class gate, 18 tailors each
    _route(kind, torch.arange(batch, device=device), batch, width // 2 // batch)
    c, b = time_pair(train_step(kind), train_step(lin), device=device, **kw)
    rows.append(Comparison(f"train fwd+bwd, {batch} classes/batch (all distinct)", "KindLinear", "nn.Linear", c, b,
                           1.3, "ratio", note=f"{width // 2 // batch} tailors per class"))

    # inference: merged dense weight for one class vs nn.Linear (same GEMM) and the factored form
    kind.ctx = None
    with torch.no_grad():
        mask = gate_table(8, kind.n_tailor, width // 2 // 8)[0].to(device)
        merged = torch.nn.Linear(width, width).to(device)
        merged.weight.copy_(kind.dense_weight(mask))
        merged.bias.copy_(kind.bias)
        xi = x.detach()
        c, b = time_pair(lambda: merged(xi), lambda: lin(xi), device=device, **kw_inf)
        rows.append(Comparison("inference fwd, merged", "merge(model, c)", "nn.Linear", c, b, 1.05, "ratio"))
        kind.compute = "factored"
        _route(kind, torch.zeros(batch, dtype=torch.long, device=device), 8, width // 2 // 8)
        c, b = time_pair(lambda: kind(xi), lambda: F.linear(xi, lin.weight, lin.bias), device=device, **kw_inf)
        rows.append(Comparison("inference fwd, factored (648 active)", "KindLinear", "nn.Linear", c, b, None,
                               "ratio", note="FLOPs 1.125x dense at this rank; wins only below width/2 active"))
    return rows
