"""Helpers shared by the CPRD experiments: arm -> objective, teacher pair scorers, rank correlation."""

from __future__ import annotations

import torch

from ..core.errors import UserError
from .config import CPRDConfig
from .model import ContrastiveDistillLoss, make_loss

ARMS = ("infonce", "kl", "rank", "cprd", "cprd_all")


def loss_for_arm(arm: str, cfg, weight: float) -> ContrastiveDistillLoss:
    """The objective of an arm; `cfg` carries k, valid, valid_param, rank_loss, teacher_temp."""
    base = CPRDConfig(k=cfg.k, weight=weight, valid=cfg.valid, valid_param=cfg.valid_param,
                      teacher_temp=cfg.teacher_temp)
    if arm == "infonce":
        return make_loss("infonce", base)
    if arm == "kl":
        return make_loss("kl", base)
    if arm == "rank":
        return make_loss(cfg.rank_loss, base)
    if arm == "cprd":
        return make_loss("cprd", base)
    if arm == "cprd_all":  # ablation: order of all in-batch negatives, not just the K hard ones
        return make_loss("cprd", base, k=None, valid="all", valid_param=None)
    raise UserError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


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


def shared_file(engine, name: str):
    """A file shared by every arm and seed of one config (its run folder's parent); None without one."""
    return None if engine.run_dir is None else engine.run_dir.parent / name


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
