"""Continual-learning metrics: pure functions of the accuracy matrix R.

R[i][j] is the test accuracy on task j after training task i (T x T, all rows filled, so the
entries above the diagonal are "before training task j" accuracies used by forward transfer).
Conventions follow GPM/TRGP (Lopez-Paz & Ranzato 2017 for ACC/BWT/FWT) and Chaudhry et al. 2018
for forgetting. BWT = -(mean drop from R[j, j]), i.e. Avalanche's BWT = -forgetting at the
"initial minus last" reading; `forgetting` here uses the best earlier accuracy instead.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import UserError


def _as_matrix(R, min_tasks: int = 1) -> torch.Tensor:
    try:
        m = torch.as_tensor(R, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"R must be a square matrix of numbers (list of rows or tensor): {e}") from None
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise UserError(f"R must be square T x T (R[i][j] = accuracy on task j after task i), got shape "
                        f"{tuple(m.shape)}")
    if m.shape[0] < min_tasks:
        raise UserError(f"this metric needs at least {min_tasks} tasks, R is {m.shape[0]} x {m.shape[0]}")
    return m


def average_accuracy(R) -> float:
    """ACC: mean accuracy over all tasks after the last task, mean_j R[T-1, j]."""
    m = _as_matrix(R)
    return m[-1].mean().item()


def backward_transfer(R) -> float:
    """BWT: mean_{j < T-1} (R[T-1, j] - R[j, j]); negative = forgetting, positive = old tasks improved."""
    m = _as_matrix(R, 2)
    T = m.shape[0]
    return (m[-1, : T - 1] - m.diagonal()[: T - 1]).mean().item()


def forward_transfer(R, b) -> float:
    """FWT: mean_{j >= 1} (R[j-1, j] - b[j]), b[j] = accuracy of the randomly initialised model on task j.

    Measures how much training tasks 0..j-1 helps task j before it is seen (GEM's definition).
    """
    m = _as_matrix(R, 2)
    bb = torch.as_tensor(b, dtype=torch.float64).flatten()
    if len(bb) != m.shape[0]:
        raise UserError(f"b must have one accuracy per task ({m.shape[0]}), got {len(bb)}")
    T = m.shape[0]
    return torch.stack([m[j - 1, j] - bb[j] for j in range(1, T)]).mean().item()


def forgetting(R) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean_{j < T-1} max_{j <= i < T-1} R[i, j] - R[T-1, j].

    Always >= 0 when accuracy never rises above its best; unlike -BWT it compares with the best
    earlier accuracy, not the one right after training task j.
    """
    m = _as_matrix(R, 2)
    T = m.shape[0]
    vals = [m[j: T - 1, j].max() - m[-1, j] for j in range(T - 1)]
    return torch.stack(vals).mean().item()


def summarize(R, b=None) -> dict[str, float]:
    """ACC, BWT, FWT (when b is given) and forgetting, for one accuracy matrix."""
    out = {"acc": average_accuracy(R), "bwt": backward_transfer(R), "forgetting": forgetting(R)}
    out["fwt"] = forward_transfer(R, b) if b is not None else math.nan
    return out
