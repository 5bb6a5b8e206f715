"""`CPRDLoss` and the baseline objectives: symmetric InfoNCE + weight x distillation, both directions.

Every objective sees the same thing: a batch similarity matrix sim [I, T] (images x texts, or
queries' targets x queries), a positive mask, the student temperature and a *teacher*. The teacher
is either a full score matrix [I, T] or a callable `teacher(rows, cols) -> scores` for index pairs
(image row, text column) -- a cross-encoder costs one forward per pair, so objectives only ask for
the pairs they use: the anchor's positive and its K student-mined negatives (A x (K+1) pairs per
direction). Subclasses differ only in `distill(s, t, ...)`, so experiments swap one object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import UserError
from .config import CPRDConfig
from .loss import (
    infonce_loss,
    kl_distill_loss,
    listnet_loss,
    margin_mse_loss,
    mine_hard_negatives,
    partial_ranking_nll,
    positive_columns,
)

Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | torch.Tensor  # (image idx, text idx) -> scores


class _PairScores(torch.autograd.Function):
    """sim.flatten()[flat] for the mined (image, text) pairs of both directions, one read.

    Why: gathering each direction separately (`sim.gather`, `sim.t().gather`) makes autograd
    allocate, zero and add one dense [I, T] gradient per direction (the transposed one through an
    extra copy); here backward zeroes one buffer and scatter-adds every pair's gradient into it.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.shape = sim.shape
        return sim.reshape(-1).index_select(0, flat)  # (index_select: about half the time of take on CPU)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (flat,) = ctx.saved_tensors
        grad = g.new_zeros(ctx.shape)
        grad.view(-1).index_add_(0, flat, g)  # repeated pairs add up
        # `grad` itself (not a view of a flat buffer) is returned, so autograd may add sim's other
        # gradient into it in place instead of allocating a third [I, T] buffer
        return grad, None


def _inverse_permutation(idx: torch.Tensor, n_cols: int) -> torch.Tensor | None:
    """[C, 1] row of each column's single positive if `idx` ([A, 1]) is a permutation (A == C), else None."""
    if idx.shape[1] != 1 or idx.shape[0] != n_cols:
        return None
    inv = torch.full_like(idx, -1).scatter_(0, idx, torch.arange(n_cols, device=idx.device)[:, None])
    return inv if bool((inv >= 0).all()) else None


def _teacher_scores(teacher: Teacher, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Teacher scores of the (image, text) pairs at flat indices image * n_cols + text; no gradients, no NaN.

    A score matrix must have the student's shape exactly: a matrix of another shape with enough
    elements would otherwise be read at the wrong pairs. A pair scorer must return one score per pair.
    """
    n_rows, n_cols = shape
    if isinstance(teacher, torch.Tensor):
        if tuple(teacher.shape) != (n_rows, n_cols):
            raise UserError(f"teacher score matrix has shape {tuple(teacher.shape)} but the student similarity "
                            f"matrix is {(n_rows, n_cols)}; pass scores for the same images (rows) and texts "
                            "(columns), or a pair scorer teacher(rows, cols)")
        out = teacher.detach().reshape(-1).index_select(0, flat)  # only the pairs used are read (and checked)
    elif callable(teacher):
        with torch.no_grad():
            out = teacher(flat.div(n_cols, rounding_mode="floor"), flat.remainder(n_cols))
        if not isinstance(out, torch.Tensor):
            raise UserError(f"the teacher pair scorer returned {type(out).__name__}; it must return a tensor of "
                            f"{len(flat)} scores, one per (row, col) pair asked")
        if out.dim() == 2 and out.shape[1] == 1:  # a [n, 1] logit column (e.g. a cross-encoder head)
            out = out[:, 0]
        if tuple(out.shape) != (len(flat),):
            raise UserError(f"the teacher pair scorer returned shape {tuple(out.shape)} for {len(flat)} pairs; "
                            "it must return one score per (row, col) pair, shape [n_pairs]")
        out = out.detach()
    else:
        raise UserError(f"teacher must be a score matrix (tensor) or a pair scorer teacher(rows, cols), "
                        f"got {type(teacher).__name__}")
    if torch.isnan(out).any():
        raise UserError("the teacher returned NaN scores; check it (e.g. fp16 overflow) before distilling")
    return out


class ContrastiveDistillLoss(nn.Module):
    """Symmetric InfoNCE plus `weight` x a distillation term on student-mined hard negatives.

    With `weight=0` (or the base class itself) this is plain InfoNCE: the `infonce` arm.
    Subclasses implement `distill(s, t, available) -> per-row losses`.
    """

    needs_positive = True  # does distill() want the positive's score in column 0?
    on_cosine = False  # does distill() take raw cosines (True) or cosine / tau (False)?

    def __init__(self, config: CPRDConfig | None = None, **overrides):
        super().__init__()
        cfg = config or CPRDConfig()
        if overrides:
            import dataclasses

            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        # the random-order control draws from its own stream: a base taken from the global RNG when the
        # loss is built (seeded per run) and a call counter, both in `extra_state`, so a resumed run
        # draws exactly what an uninterrupted one would
        self.random_base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if cfg.teacher_source == "random" else 0
        self.random_calls = 0

    def get_extra_state(self) -> dict:
        return {"random_base": self.random_base, "random_calls": self.random_calls}

    def set_extra_state(self, state: dict) -> None:
        self.random_base, self.random_calls = int(state["random_base"]), int(state["random_calls"])

    def _random_scores(self, n: int, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.random_base * 1_000_003 + self.random_calls)
        self.random_calls += 1
        return torch.rand(n, generator=g).to(device=like.device, dtype=like.dtype)

    def distill(self, s: torch.Tensor, t: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return s.new_zeros(s.shape[0])

    def _mine(self, sim, pos, pos_idx=None):
        """Candidate columns per anchor row (positive first if needed) and their availability.

        `pos_idx`: [A, P] positive columns from `positive_columns`, or None when rows differ in P.
        """
        p = None if pos_idx is None else pos_idx.shape[1]
        hard_idx, available = mine_hard_negatives(sim, pos, self.config.k, positives_per_row=p, skip=self.config.skip)
        if not self.needs_positive:
            return hard_idx, available
        # the best-scoring positive of each anchor (the only one when there is one caption per image)
        best_pos = pos_idx if p == 1 else sim.detach().masked_fill(~pos, float("-inf")).argmax(1, keepdim=True)
        return torch.cat([best_pos, hard_idx], 1), torch.cat([torch.ones_like(available[:, :1]), available], 1)

    def forward(self, sim: torch.Tensor, positive_mask: torch.Tensor, teacher: Teacher | None = None,
                tau: float | torch.Tensor = 0.07, weight: float | None = None) -> dict[str, torch.Tensor]:
        """Returns {"loss", "infonce", "distill"}; `weight` overrides the configured one (λ warm-up)."""
        cfg = self.config
        pos = positive_mask.bool()
        if pos.shape != sim.shape:
            raise UserError(f"positive_mask has shape {tuple(pos.shape)}, sim {tuple(sim.shape)}")
        u = pos.view(torch.uint8)  # a uint8 max needs no widened copy of the mask (bool any() and sum() do)
        if not (bool(u.amax(1).all()) and bool(u.amax(0).all())):
            raise UserError("every image and every text in the batch needs at least one positive")
        idx_row = positive_columns(pos)
        idx_col = _inverse_permutation(idx_row, pos.shape[1]) if idx_row is not None else None
        if idx_col is None:
            idx_col = positive_columns(pos.t())
        nce = 0.5 * (infonce_loss(sim, pos, tau, positive_idx=idx_row) +
                     infonce_loss(sim.t(), pos.t(), tau, positive_idx=idx_col))
        w = cfg.weight if weight is None else weight
        if type(self).distill is ContrastiveDistillLoss.distill or w == 0:
            return {"loss": nce, "infonce": nce.detach(), "distill": nce.new_zeros(())}
        if teacher is None and cfg.teacher_source == "teacher":
            raise UserError(f"{type(self).__name__} needs a teacher (score matrix or pair scorer)")
        # Reconstructed: the distillation term uses the ITC temperature (or cfg.tau) but does not train it.
        t_d = cfg.tau if cfg.tau is not None else (tau.detach() if torch.is_tensor(tau) else tau)
        views = [(sim, pos, idx_row)] + ([(sim.t(), pos.t(), idx_col)] if cfg.symmetric else [])
        mined = [self._mine(m, p, i) for m, p, i in views]
        # one teacher call and one read of sim for both directions' pairs, as flat (image, text) indices
        n = sim.shape[1]
        (cols_i, avail_i), *rest = mined
        flat = [cols_i + torch.arange(0, cols_i.shape[0] * n, n, device=sim.device)[:, None]]
        if rest:  # text anchors j, image columns r: pair (r, j)
            cols_t = rest[0][0]
            flat.append(cols_t * n + torch.arange(cols_t.shape[0], device=sim.device)[:, None])
        flat = torch.cat([f.reshape(-1) for f in flat])
        raw = _PairScores.apply(sim, flat)
        if cfg.teacher_source == "self":  # control: the student's own order, so no knowledge is added
            t_all = raw.detach().clone()
        elif cfg.teacher_source == "random":  # control: a fresh random order every call
            t_all = self._random_scores(raw.shape[0], raw)
        else:
            t_all = _teacher_scores(teacher, flat, tuple(sim.shape)).to(sim.dtype)
        s_all = raw if self.on_cosine else raw / t_d
        widths = [c.shape[1] for c, _ in mined]
        if len(set(widths)) == 1:  # one batched call for both directions (fewer small ops)
            avail = torch.cat([a for _, a in mined]) if rest else avail_i
            rows = self.distill(s_all.view(-1, widths[0]), t_all.view(-1, widths[0]), avail)
            if rest and cols_i.shape[0] != cols_t.shape[0]:  # each direction weighs the same
                d = torch.stack([r.mean() for r in rows.split([cols_i.shape[0], cols_t.shape[0]])]).mean()
            else:  # equal row counts: the mean over all rows is the mean of the two directions' means
                d = rows.mean()
        else:
            sizes = [c.numel() for c, _ in mined]
            d = torch.stack([self.distill(x.view(c.shape), y.view(c.shape), a).mean() for x, y, (c, a) in
                             zip(s_all.split(sizes), t_all.split(sizes), mined)]).mean()
        return {"loss": nce + w * d, "infonce": nce.detach(), "distill": d.detach()}


class InfoNCELoss(ContrastiveDistillLoss):
    """Symmetric InfoNCE only (the reference arm)."""


class CPRDLoss(ContrastiveDistillLoss):
    """InfoNCE + λ·CPRD (image->text and text->image): the paper's objective (reconstructed form).

    `config.k=None` distils the order of *all* negatives instead of the K hard ones (ablation of finding 2).
    """

    @property
    def needs_positive(self) -> bool:
        # the positive never enters the ranked list; only below_positive reads its teacher score
        return self.config.valid == "below_positive"

    def distill(self, s, t, available):
        cfg = self.config
        t_pos = None
        if self.needs_positive:  # column 0 is the positive: its teacher score sets the validity cut
            t_pos, s, t, available = t[:, 0], s[:, 1:], t[:, 1:], available[:, 1:]
        return partial_ranking_nll(s, t, valid=cfg.valid, valid_param=cfg.valid_param, available=available,
                                   reduction="none", t_pos=t_pos, rank_reduction=cfg.rank_reduction)


class KLDistillLoss(ContrastiveDistillLoss):
    """InfoNCE + λ·KL logit distillation over (positive, K mined negatives)."""

    def distill(self, s, t, available):
        t = t.masked_fill(~available, float("-inf"))
        s = s.masked_fill(~available, -1e9)
        return kl_distill_loss(s, t, self.config.teacher_temp, reduction="none")


class ListNetDistillLoss(ContrastiveDistillLoss):
    """InfoNCE + λ·ListNet over (positive, K mined negatives)."""

    def distill(self, s, t, available):
        t = t.masked_fill(~available, float("-inf"))
        s = s.masked_fill(~available, -1e9)
        return listnet_loss(s, t, self.config.teacher_temp, reduction="none")


class MarginMSEDistillLoss(ContrastiveDistillLoss):
    """InfoNCE + λ·Margin-MSE between student and teacher (positive - negative) margins.

    `config.margin_on="cosine"` (default) regresses raw cosine margins on the teacher's margins, as
    sentence-transformers' MarginMSELoss does; "logit" uses cosine / tau, whose margins are 1/tau
    (about 14-20x) larger and, at λ = 1, swamp InfoNCE.
    """

    @property
    def on_cosine(self) -> bool:
        return self.config.margin_on == "cosine"

    def distill(self, s, t, available):
        if not available.all():
            raise UserError("margin-MSE needs a fixed k (not k=None)")
        return margin_mse_loss(s, t, reduction="none")


LOSSES = {"infonce": InfoNCELoss, "cprd": CPRDLoss, "kl": KLDistillLoss, "listnet": ListNetDistillLoss,
          "margin_mse": MarginMSEDistillLoss}


def make_loss(name: str, config: CPRDConfig | None = None, **overrides) -> ContrastiveDistillLoss:
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name](config, **overrides)
