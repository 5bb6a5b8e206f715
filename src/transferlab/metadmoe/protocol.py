"""Test-time protocols: how a method meets the unlabeled batches of one target domain.

A target domain's images arrive as consecutive unlabeled batches of `bs` images. Two protocols:
- `per_domain` (official Meta-DMoE `eval`): adapt **once**, on the domain's first batch, then predict
  every batch of the domain (the first included) with that adapted model; the next domain starts
  again from the source weights.
- `per_batch`: adapt to each batch from the source weights and predict that batch (episodic).
TENT has its own two forms: `online` (official: keeps adapting across the batches of a domain,
reset at the start of each domain) and `episodic` (reset before every batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from .baselines import BNAdapt, Tent
from .diagnostics import feature_mse
from .model import AdaptedStudent, MetaDMoE

PROTOCOLS = ("per_domain", "per_batch")
TENT_MODES = ("online", "episodic")


def chunks(n: int, bs: int) -> list[torch.Tensor]:
    """Consecutive index batches of `bs`; a last batch of one image joins the one before (BN needs two)."""
    out = list(torch.arange(n).split(bs))
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2:] = [torch.cat(out[-2:])]
    return out


@torch.no_grad()
def static_accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    bs: int) -> float:
    """Accuracy of a predictor that adapts to nothing, or only to each batch itself (ERM, BN-adapt)."""
    return sum((predict(x[b]).argmax(-1) == y[b]).sum().item() for b in chunks(len(x), bs)) / len(x)


def metadmoe_accuracy(m: MetaDMoE, x: torch.Tensor, y: torch.Tensor, bs: int, protocol: str,
                      exclude: int | None = None, target_fn: Callable | None = None) -> tuple[float, dict]:
    """Held-out accuracy of Meta-DMoE under `protocol`, and the feature MSE to the teacher before/after.

    `target_fn(xb)` replaces the teacher (oracle bound); the MSE is then to that target. The MSE is
    measured on the adaptation batch(es): the first batch (per_domain) or the mean over batches.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    parts = chunks(len(x), bs)
    support = parts[:1] if protocol == "per_domain" else parts
    correct, mses = 0, []
    adapted = None
    for b in support:
        xb = x[b]
        tgt = target_fn(xb) if target_fn is not None else None
        adapted = m.adapt(xb, exclude_expert=exclude, target=tgt)
        mses.append(feature_mse(m, xb, adapted, exclude) if tgt is None else _mse_to(m, adapted, xb, tgt))
        if protocol == "per_batch":
            correct += (adapted.predict(xb).argmax(-1) == y[b]).sum().item()
    if protocol == "per_domain":
        correct = sum((adapted.predict(x[b]).argmax(-1) == y[b]).sum().item() for b in parts)
    mse = {k: sum(d[k] for d in mses) / len(mses) for k in ("before", "after")}
    return correct / len(x), mse


@torch.no_grad()
def _mse_to(m: MetaDMoE, adapted: AdaptedStudent, xb: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE of the source and the adapted student's features to a given target feature."""
    source = AdaptedStudent(m.student, {n: p.detach() for n, p in m.student.named_parameters()}, m.input_shape,
                            m.layout, batch_stats=adapted.batch_stats)
    was = m.student.training
    m.student.train(adapted.batch_stats)
    try:
        return {"before": F.mse_loss(source.features(xb), target).item(),
                "after": F.mse_loss(adapted.features(xb), target).item()}
    finally:
        m.student.train(was)


def tent_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, lr: float,
                  mode: str = "online") -> float:
    """TENT on one domain: `online` adapts across its batches from a fresh copy; `episodic` resets per batch."""
    if mode not in TENT_MODES:
        raise UserError(f"tent mode must be one of {', '.join(TENT_MODES)}, got {mode!r}")
    tent = Tent(model, lr=lr, episodic=mode == "episodic")  # a fresh copy: reset at the domain's start
    correct = 0
    for b in chunks(len(x), bs):
        tent.update(x[b])
        correct += (tent.predict(x[b]).argmax(-1) == y[b]).sum().item()
    return correct / len(x)


def bn_adapt_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    """BN-adapt: every batch is normalised with its own statistics."""
    return static_accuracy(BNAdapt(model).predict, x, y, bs)
