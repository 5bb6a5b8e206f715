"""Helpers shared by the CPRD experiments: arm -> objective, teacher pair scorers, rank correlation."""

from __future__ import annotations

import torch

from ..core.errors import UserError
from .config import CPRDConfig
from .model import ContrastiveDistillLoss, make_loss

ARMS = ("infonce", "kl", "listnet", "margin_mse", "cprd", "cprd_all", "cprd_easy", "cprd_self", "cprd_random")
ARM_HELP = ("arms: infonce (reference), kl (logit KL, teacher temperature grid), listnet (positive + K), "
            "margin_mse (raw cosines), cprd, cprd_all (all negatives), cprd_easy (ranks K+1..2K), "
            "cprd_self (the student's own detached scores as teacher), cprd_random (a random teacher order)")
_CPRD_ARMS = {  # overrides of the CPRD loss per arm; every one is "CPRD with something changed"
    "cprd": {},
    "cprd_all": {"k": None},
    "cprd_easy": {"skip": "k"},
    "cprd_self": {"teacher_source": "self"},
    "cprd_random": {"teacher_source": "random"},
}


def arm_grid(arm: str, cfg) -> list[dict]:
    """Settings tried for an arm, each trained in full; the best on validation RSUM is kept.

    λ (`cfg.weights`) for every distillation arm; the teacher temperature (`cfg.teacher_temps`) for
    kl and listnet; the validity rule (`cfg.valid_rules`) for every CPRD arm (the controls get the
    same selection as cprd itself, so a difference between them is not a difference in tuning).
    """
    if arm == "infonce":
        return [{"weight": 0.0}]
    if arm in ("kl", "listnet"):
        return [{"weight": w, "teacher_temp": tt} for tt in cfg.teacher_temps for w in cfg.weights]
    if arm == "margin_mse":
        return [{"weight": w} for w in cfg.weights]
    if arm in _CPRD_ARMS:
        rules = ("all",) if arm == "cprd_all" else cfg.valid_rules
        return [{"weight": w, "valid": r} for r in rules for w in cfg.weights]
    raise UserError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def loss_for_arm(arm: str, cfg, setting: dict) -> ContrastiveDistillLoss:
    """The objective of an arm at one grid `setting`; `cfg` carries k and rank_reduction."""
    base = CPRDConfig(k=cfg.k, weight=setting["weight"], rank_reduction=cfg.rank_reduction,
                      teacher_temp=setting.get("teacher_temp", 1.0))
    if arm in ("infonce", "kl", "listnet", "margin_mse"):
        return make_loss(arm, base)
    if arm not in _CPRD_ARMS:
        raise UserError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    over = {key: (cfg.k if v == "k" else v) for key, v in _CPRD_ARMS[arm].items()}
    return make_loss("cprd", base, valid=setting.get("valid", "all"), **over)


def check_grid_config(cfg) -> None:
    """Shared checks of the arms and grids of a CPRD experiment config."""
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        raise UserError(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if not cfg.weights or any(w <= 0 for w in cfg.weights):
        raise UserError("weights must list positive λ values")
    if not cfg.teacher_temps or any(t <= 0 for t in cfg.teacher_temps):
        raise UserError("teacher_temps must list positive temperatures")
    if not cfg.valid_rules or any(r not in ("all", "below_positive") for r in cfg.valid_rules):
        raise UserError("valid_rules must list rules among all, below_positive (the rules that need no parameter)")


def setting_label(setting: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items())


class DenseWhenLarge:
    """Teacher pair scorer for one batch that switches to one dense I x T call when many pairs are asked.

    CPRD over all negatives asks for nearly every pair in both directions; scoring the dense matrix
    once and indexing it halves the teacher cost. `score_pairs(rows, cols)` must be no-grad.
    """

    def __init__(self, score_pairs, n_rows: int, n_cols: int):
        self.score_pairs, self.n_rows, self.n_cols = score_pairs, n_rows, n_cols
        self.dense = None

    def __call__(self, rows, cols):
        if self.dense is None and len(rows) > 0.75 * self.n_rows * self.n_cols:
            r = torch.arange(self.n_rows).repeat_interleave(self.n_cols)
            c = torch.arange(self.n_cols).repeat(self.n_rows)
            self.dense = self.score_pairs(r, c).reshape(self.n_rows, self.n_cols)
        if self.dense is not None:
            return self.dense[rows, cols]
        return self.score_pairs(rows, cols)


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation (average ranks for ties not needed: continuous scores)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def spread_stats(x: torch.Tensor, prefix: str) -> dict[str, float]:
    """Concentration summary of a score sample: std and inter-quartile range."""
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.double))
    return {f"{prefix}_std": float(x.std()), f"{prefix}_iqr": float(q[1] - q[0])}
