"""Contrastive Partial Ranking Distillation (CPRD) and the contrastive loss it is added to.

Chen et al., "How to Make Cross Encoder a Good Teacher for Efficient Image-Text Retrieval?",
CVPR 2024 (arXiv 2407.07479). Per anchor (an image for image->text, a text for text->image):

1. mine: the student's K most similar *non-positive* candidates (`mine_hard_negatives`);
2. rank: sort them by the teacher's score (stable sort, so ties keep the student's order);
3. cut:  the first J* of them are "valid" (rule `valid`, reconstructed: the paper's rule is unknown);
4. for every valid rank j, a softmax cross-entropy that puts candidate j above all candidates
   ranked after it (valid or not), on student logits s/tau.

That is the negative log-likelihood of the teacher's top-J* prefix under a Plackett-Luce model
of the student's scores -- it reads the teacher only through its *order*, so it ignores the
teacher's concentrated score distribution (the paper's finding 1). The positive never enters
the list, so CPRD never asks a negative to outrank the positive and does not fight InfoNCE
(finding 3). The loss is vectorised: one `logcumsumexp` over the reversed list gives every
suffix denominator at once; there is no Python loop over anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import UserError

VALID_RULES = ("all", "top_m", "threshold")


def _check_matrix(name: str, x: torch.Tensor, shape=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise UserError(f"{name} must be a 2-D [anchors, candidates] matrix, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise UserError(f"{name} has shape {tuple(x.shape)} but the student similarity matrix has shape "
                        f"{tuple(shape)}; pass teacher scores for the same anchors and candidates "
                        "(or [anchors, k] scores together with hard_idx)")


def _check_finite_teacher(t: torch.Tensor) -> None:
    if torch.isnan(t).any():
        raise UserError("teacher_scores contain NaN; check the teacher (e.g. fp16 overflow) or drop those pairs "
                        "with candidate_mask")


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k (values, indices), sorted descending; exact, and ~2x faster than `topk` on CPU.

    Why: CPU `torch.topk` costs ~40 us per row of 512 at k=16 -- the largest part of CPRD's overhead.
    Two stages: the k groups (of g columns) with the largest maxima must contain the k largest
    entries (each such entry's group has a max >= the k-th largest value, and at most k groups do),
    so a top-k over the group maxima and then over those k*g candidates gives the exact answer.
    """
    n, c = x.shape
    g = 8
    if x.device.type != "cpu" or c < 4 * g * k or c % g:
        return x.topk(k, dim=1)
    gmax = x.view(n, c // g, g).amax(2)
    groups = gmax.topk(k, dim=1).indices  # [n, k]
    cols = (groups[:, :, None] * g + torch.arange(g, device=x.device)).reshape(n, k * g)
    vals, pos = x.gather(1, cols).topk(k, dim=1)
    return vals, cols.gather(1, pos)


def mine_hard_negatives(student_sim: torch.Tensor, positive_mask: torch.Tensor, k: int | None,
                        candidate_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's K most similar non-positive candidates per anchor.

    Args:
        student_sim: [A, C] student similarities (not modified; mining uses a detached copy).
        positive_mask: [A, C] bool, True for *every* positive of the anchor (several captions per image).
        k: negatives per anchor; None takes all of them (the `cprd_all` ablation).
        candidate_mask: optional [A, C] bool of candidates allowed at all (e.g. padding = False).

    Returns:
        (hard_idx [A, K] long, available [A, K] bool). Indices are sorted by decreasing student
        similarity; `available` is False only for slots beyond a row's number of negatives (k=None).
    """
    _check_matrix("student_sim", student_sim)
    _check_matrix("positive_mask", positive_mask, student_sim.shape)
    if candidate_mask is not None:
        _check_matrix("candidate_mask", candidate_mask, student_sim.shape)
    pos = positive_mask.bool()
    blocked = pos if candidate_mask is None else pos | ~candidate_mask.bool()
    n_neg = blocked.shape[1] - blocked.sum(1)
    if k is None:
        k = int(n_neg.max().item())
    else:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive integer (negatives per anchor), got {k!r}")
        few = int(n_neg.min().item())
        if k > few:
            row = int(n_neg.argmin().item())
            raise UserError(f"k={k} is larger than the number of negatives ({few}) of anchor {row}; "
                            f"lower k to at most {few} or use a larger batch / candidate pool")
    if k < 1:
        raise UserError("no negatives to mine: every candidate is a positive or masked out")
    scores = student_sim.detach().masked_fill(blocked, float("-inf"))
    values, indices = topk_rows(scores, k)  # sorted, largest first
    return indices, torch.isfinite(values)


def valid_prefix(t_sorted: torch.Tensor, available: torch.Tensor, rule: str = "all",
                 param: float | None = None) -> torch.Tensor:
    """J* per anchor: how many of the teacher-sorted candidates are valid (reconstructed rules).

    - "all": every mined candidate (J* = K);
    - "top_m": the teacher's top `param` candidates (a fixed prefix);
    - "threshold": the candidates whose teacher score is >= `param`. Unlike the two others this is
      not invariant to monotone transforms of the teacher scores: `param` must be on the teacher's
      calibrated scale (e.g. an ITM probability).
    """
    n_avail = available.sum(1)
    if rule == "all":
        return n_avail
    if rule == "top_m":
        if param is None or int(param) < 1 or int(param) != param:
            raise UserError(f"valid='top_m' needs valid_param = a positive integer m, got {param!r}")
        return n_avail.clamp(max=int(param))
    if rule == "threshold":
        if param is None:
            raise UserError("valid='threshold' needs valid_param = the teacher-score threshold")
        return ((t_sorted >= param) & available).sum(1)
    raise UserError(f"unknown validity rule {rule!r}; choose from {', '.join(VALID_RULES)}")


def masked_logsumexp(x: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """logsumexp over the kept entries (-inf for a row with none), without slow exp() underflow paths.

    Why: CPU exp() of arguments below about -87 (masked or far-below-max logits) takes a scalar
    path ~20x slower than normal. Clamping x - max at -80 and multiplying by the mask is exact to
    float precision (a clamped entry would contribute < 2e-35 next to the max's 1) and fast.
    """
    if keep is None:
        m = x.detach().amax(dim, keepdim=True)
        return torch.log(torch.exp((x - m).clamp(min=-80.0)).sum(dim)) + m.squeeze(dim)
    m = x.detach().masked_fill(~keep, float("-inf")).amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp((x - m).clamp(min=-80.0)) * keep
    return torch.log(e.sum(dim)) + m.squeeze(dim)


def suffix_logsumexp(s: torch.Tensor) -> torch.Tensor:
    """lse[:, j] = log sum_{k >= j} exp(s[:, k]), exact and stable.

    Why three paths: when a row's logits span < 80, a cumulative sum of exp(s - max) is exact and the
    cheapest; otherwise a masked [A, K, K] logsumexp (short lists) or `logcumsumexp` (long lists, whose
    CPU backward is slow) keeps far-below-max entries from underflowing.
    """
    k = s.shape[1]
    m = s.detach().amax(1, keepdim=True)
    if bool(((m - s.detach().amin(1, keepdim=True)) < 80).all()):
        # fast path: every exp(s - max) is representable, so suffix sums of exp are exact
        suffix = torch.exp(s - m).flip(1).cumsum(1).flip(1)
        return torch.log(suffix) + m
    if k > 64:
        return torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    upper = torch.ones(k, k, dtype=torch.bool, device=s.device).triu()  # [j, k]: k >= j
    return masked_logsumexp(s[:, None, :].expand(-1, k, -1), upper, dim=2)


def partial_ranking_nll(s: torch.Tensor, t: torch.Tensor, *, valid: str = "all", valid_param: float | None = None,
                        available: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Truncated Plackett-Luce NLL of the teacher's order of each row's candidates.

    Args:
        s: [A, K] student logits (similarity / tau), differentiable.
        t: [A, K] teacher scores of the same candidates (detached here).
        available: [A, K] bool, False for padding slots (they sort last and carry no term).

    Per row: sort by t (descending, stable), J* = valid_prefix(...); for each rank j < J* that has
    at least one candidate below it, the term is logsumexp(s_j..s_K) - s_j. A row's loss is the mean
    of its terms (0 when it has none, never NaN).
    """
    if available is None:
        available = torch.ones_like(s, dtype=torch.bool)
    t = t.detach().to(s.dtype)
    t = t.masked_fill(~available, float("-inf"))  # padding sorts last
    order = torch.sort(t, dim=1, descending=True, stable=True).indices
    s_sorted = s.gather(1, order)
    t_sorted = t.gather(1, order)
    avail_sorted = available.gather(1, order)
    # padding slots: exp() must be ~0 next to the real entries yet stay in exp's fast range
    floor = s_sorted.detach().masked_fill(~avail_sorted, float("inf")).amin(1, keepdim=True) - 60.0
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    s_sorted = torch.where(avail_sorted, s_sorted, floor.expand_as(s_sorted))
    lse = suffix_logsumexp(s_sorted)
    terms = lse - s_sorted
    j_star = valid_prefix(t_sorted, avail_sorted, valid, valid_param)
    n_avail = avail_sorted.sum(1)
    ranks = torch.arange(s.shape[1], device=s.device)
    # the last available candidate has nothing below it: its term is log(1) = 0, so it is not counted
    use = (ranks[None, :] < j_star[:, None]) & (ranks[None, :] < (n_avail - 1)[:, None])
    terms = torch.where(use, terms, torch.zeros_like(terms))
    per_row = terms.sum(1) / use.sum(1).clamp(min=1)
    return _reduce(per_row, reduction)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise UserError(f"reduction must be mean, sum or none, got {reduction!r}")


def cprd_loss(student_sim: torch.Tensor, teacher_scores: torch.Tensor, positive_mask: torch.Tensor,
              k: int | None = 8, tau: float | torch.Tensor = 0.07, valid: str = "all",
              valid_param: float | None = None, *, hard_idx: torch.Tensor | None = None,
              candidate_mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """CPRD in one direction (rows are anchors).

    Args:
        student_sim: [A, C] student similarities (e.g. cosine), differentiable.
        teacher_scores: [A, C] teacher scores for every pair, or [A, K] aligned with `hard_idx`
            (then the teacher only has to score the A x K mined pairs). Never receives a gradient.
        positive_mask: [A, C] bool, every positive of each anchor.
        k: hard negatives per anchor (reconstructed default 8); None = all negatives (ablation).
        tau: student temperature (a float or a 0-dim tensor, e.g. the learnable InfoNCE temperature).
        valid, valid_param: validity rule for the partial ranking, see `valid_prefix`.
        hard_idx: optional precomputed [A, K] indices from `mine_hard_negatives`.

    Raises UserError for mismatched shapes, k larger than a row's number of negatives, NaN teacher
    scores, or a non-positive temperature.
    """
    _check_matrix("student_sim", student_sim)
    if torch.is_tensor(tau):
        if (tau.detach() <= 0).any():
            raise UserError(f"tau must be positive, got {tau.detach().flatten()[:1].item()}")
    elif not tau > 0:
        raise UserError(f"tau must be positive, got {tau!r}")
    if hard_idx is None:
        _check_matrix("teacher_scores", teacher_scores, student_sim.shape)
        _check_finite_teacher(teacher_scores)
        hard_idx, available = mine_hard_negatives(student_sim, positive_mask, k, candidate_mask)
        t = teacher_scores.detach().gather(1, hard_idx)
    else:
        _check_matrix("positive_mask", positive_mask, student_sim.shape)
        _check_matrix("hard_idx", hard_idx)
        if hard_idx.shape[0] != student_sim.shape[0]:
            raise UserError(f"hard_idx has {hard_idx.shape[0]} rows, student_sim {student_sim.shape[0]}")
        if tuple(teacher_scores.shape) == tuple(student_sim.shape):
            t = teacher_scores.detach().gather(1, hard_idx)
        elif tuple(teacher_scores.shape) == tuple(hard_idx.shape):
            t = teacher_scores.detach()
        else:
            raise UserError(f"teacher_scores has shape {tuple(teacher_scores.shape)}; expected "
                            f"{tuple(student_sim.shape)} or, aligned with hard_idx, {tuple(hard_idx.shape)}")
        _check_finite_teacher(t)
        if positive_mask.bool().gather(1, hard_idx).any():
            raise UserError("hard_idx contains a positive of its anchor; mine with mine_hard_negatives")
        available = torch.ones_like(hard_idx, dtype=torch.bool)
    s = student_sim.gather(1, hard_idx) / tau
    return partial_ranking_nll(s, t, valid=valid, valid_param=valid_param, available=available, reduction=reduction)


def infonce_loss(sim: torch.Tensor, positive_mask: torch.Tensor, tau: float | torch.Tensor,
                 candidate_mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Multi-positive InfoNCE per row: -log( sum_pos exp(s/tau) / sum_all exp(s/tau) )."""
    logits = sim / tau
    keep = None if candidate_mask is None else candidate_mask.bool()
    pos = positive_mask.bool() if keep is None else positive_mask.bool() & keep
    per_row = masked_logsumexp(logits, keep, 1) - masked_logsumexp(logits, pos, 1)
    return _reduce(per_row, reduction)


# ---- baselines (same inputs as CPRD: the anchor's positive plus its K student-mined negatives) -----

def kl_distill_loss(s: torch.Tensor, t: torch.Tensor, teacher_temp: float = 1.0, reduction: str = "mean"):
    """Logit distillation: KL(softmax(t / T_t) || softmax(s)) per row, with s already divided by tau.

    Column 0 is the positive, the rest the mined negatives (as in sentence-transformers' DistillKLDivLoss).
    With a concentrated teacher (scores close together) the target is nearly uniform -- finding 1.
    """
    p_t = F.softmax(t.detach().to(s.dtype) / teacher_temp, dim=1)
    per_row = (p_t * (torch.log(p_t.clamp_min(1e-12)) - F.log_softmax(s, dim=1))).sum(1)
    return _reduce(per_row, reduction)


def listnet_loss(s: torch.Tensor, t: torch.Tensor, teacher_temp: float = 1.0, reduction: str = "mean"):
    """ListNet (top-one probability) cross-entropy: -sum softmax(t/T_t) log softmax(s); = KL + teacher entropy."""
    p_t = F.softmax(t.detach().to(s.dtype) / teacher_temp, dim=1)
    return _reduce(-(p_t * F.log_softmax(s, dim=1)).sum(1), reduction)


def margin_mse_loss(s: torch.Tensor, t: torch.Tensor, reduction: str = "mean"):
    """Margin-MSE (Hofstaetter et al. 2020): (s_pos - s_neg - (t_pos - t_neg))^2, averaged over negatives.

    Column 0 is the positive. Regression on score differences, so it depends on the teacher's scale.
    """
    t = t.detach().to(s.dtype)
    ds = s[:, :1] - s[:, 1:]
    dt = t[:, :1] - t[:, 1:]
    return _reduce(((ds - dt) ** 2).mean(1), reduction)
