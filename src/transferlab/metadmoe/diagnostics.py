"""Diagnostics that say whether distillation from the experts can help on a target domain.

Meta-DMoE only helps if the aggregated teacher knows more about the target than the student, and
if the inner step moves the student's features towards the teacher's. These functions measure the
pieces separately, without labels entering any adaptation:
- `expert_matrix`: accuracy of every expert (with its own head) on every domain — do they specialise?
- `ensemble_accuracy`: the experts' averaged logits on a domain (what the experts know together).
- `teacher_accuracy`: the teacher feature read out by a head fitted on source data — the aggregator's
  pre-training classifier (`head="aggregator"`) or the student's own head (`head="student"`).
- `feature_mse`: MSE between the student's and the teacher's features before and after the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from .model import AdaptedStudent, MetaDMoE


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512) -> float:
    """Fraction of `x` whose argmax of `predict` equals `y` (fixed-size chunks, so eval-mode models only)."""
    if len(x) == 0 or len(x) != len(y):
        raise UserError(f"accuracy needs as many labels as images (got {len(x)} images, {len(y)} labels)")
    correct = sum((predict(x[b]).argmax(-1) == y[b]).sum().item() for b in torch.arange(len(x)).split(batch_size))
    return correct / len(x)


def _eval_logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    module.eval()
    try:
        return module.head(module.features(x))
    finally:
        module.train(was)


@torch.no_grad()
def expert_matrix(model: MetaDMoE, domains: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[list[float]]:
    """`out[k][j]` = accuracy (0..1) of expert k, eval mode, with its own head, on domain j's (x, y)."""
    dev = model.device
    return [[accuracy(lambda xb, e=e: _eval_logits(e, xb.to(dev)), x, y.to(dev)) for x, y in domains]
            for e in model.experts]


@torch.no_grad()
def ensemble_accuracy(model: MetaDMoE, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the mean of all experts' logits (eval mode)."""
    dev = model.device
    return accuracy(lambda xb: torch.stack([_eval_logits(e, xb.to(dev)) for e in model.experts]).mean(0),
                    x, y.to(dev))


@torch.no_grad()
def teacher_accuracy(model: MetaDMoE, x: torch.Tensor, y: torch.Tensor, head: str = "aggregator",
                     exclude: int | None = None) -> float:
    """Accuracy of the teacher feature (all experts, or all but `exclude`) read out by a source-fitted head.

    `head="aggregator"`: the aggregator's cross-entropy pre-training classifier (needs one);
    `head="student"`: the student's head, the one the adapted student predicts with.
    """
    if head not in ("aggregator", "student"):
        raise UserError(f"teacher_accuracy head must be 'aggregator' or 'student', got {head!r}")
    agg = model.aggregator
    if head == "aggregator" and (agg is None or agg.classifier is None or model.config.teacher != "aggregator"):
        raise UserError("head='aggregator' needs an Aggregator(num_classes=...) teacher; use head='student'")
    dev = model.device
    mods = [(m, m.training) for m in (model.student, agg) if m is not None]
    for m, _ in mods:
        m.eval()
    try:
        def predict(xb):
            t = model.teacher(xb.to(dev), exclude)
            return agg.classifier(t) if head == "aggregator" else model.student.head(t)
        return accuracy(predict, x, y.to(dev))
    finally:
        for m, was in mods:
            m.train(was)


@torch.no_grad()
def feature_mse(model: MetaDMoE, x: torch.Tensor, adapted: AdaptedStudent | None = None,
                exclude: int | None = None) -> dict[str, float]:
    """MSE(student features, teacher feature) on x: `before` the step and, given `adapted`, `after` it.

    Student and experts run in the modes the step itself uses (`config.train_mode`, `config.expert_bn`),
    so `before` is exactly the inner loss the step descends.
    """
    model._check(x, "x")
    cfg = model.config
    agg = model.aggregator
    was = agg.training if agg is not None else None
    if agg is not None:
        agg.eval()
    try:
        target = model.teacher(x, exclude, cfg.expert_bn)
    finally:
        if agg is not None:
            agg.train(was)
    source = AdaptedStudent(model.student, {n: p.detach() for n, p in model.student.named_parameters()},
                            model.input_shape, model.layout, batch_stats=cfg.train_mode == "train")
    out = {"before": F.mse_loss(_features(source, x), target).item()}
    if adapted is not None:
        out["after"] = F.mse_loss(_features(adapted, x), target).item()
    return out


def _features(student: AdaptedStudent, x: torch.Tensor) -> torch.Tensor:
    was = student.student.training
    student.student.train(student.batch_stats)
    try:
        return student.features(x)
    finally:
        student.student.train(was)
