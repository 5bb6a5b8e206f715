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


def _group_view(x: torch.Tensor, g: int):
    """[n, c] -> (xv, gdim): a view whose `gdim` axis enumerates c // g column groups of g columns each.

    Why two layouts: a group max must reduce along a strided axis with a unit-stride axis outside it to
    be vectorised. Row-major x (image->text) groups strided columns {j, j + c/g, ...}; a transposed x
    (text->image, `sim.t()`) groups contiguous runs of columns, which are rows of the underlying matrix.
    """
    n, c = x.shape
    if x.stride(1) == 1:
        return x.view(n, g, c // g), 2  # group j = columns j + (c // g) * [0, g)
    return x.view(n, c // g, g), 1  # group j = columns j * g + [0, g)


def _threshold_topk(x: torch.Tensor, k: int, g: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact row-wise top-k (sorted) by group maxima, a threshold and compaction; None if it cannot help.

    Why: CPU `topk` is branchy scalar code (~10 ns per element), while max/compare/cumsum/scatter are
    vectorised. Let tau be the k-th largest of the rows' group maxima: those k maxima are k entries
    >= tau, so every top-k entry is >= tau and lies in one of the k chosen groups (an entry > tau lies
    in a group whose max > tau, which is chosen; ties at tau only swap equal values). Typically only
    ~k + 10 of the k * g candidates pass `>= tau`; they are compacted to the left of a narrow buffer
    and only that buffer goes through `topk`.
    """
    n, c = x.shape
    xv, gdim = _group_view(x, g)
    gmax = xv.amax(3 - gdim)  # [n, c // g]
    gval, groups = gmax.topk(k, dim=1, sorted=False)
    tau = gval.amin(1, keepdim=True)
    if gdim == 2:  # candidates [n, g, k]: member a of chosen group b is column groups[b] + a * (c // g)
        vals = xv.gather(2, groups[:, None, :].expand(n, g, k)).view(n, g * k)
    else:  # candidates [n, k, g]: column groups[b] * g + a
        vals = xv.gather(1, groups[:, :, None].expand(n, k, g)).view(n, k * g)
    keep = vals >= tau  # NaN compares False (then count < k: fall back)
    slot = keep.cumsum(1)  # 1-based slot of each survivor; non-survivors go to slot 0 (discarded)
    count = slot[:, -1].clone()  # (a copy: slot is modified in place below)
    lo, hi = count.aminmax()
    lo, hi = int(lo), int(hi)
    if lo < k or hi > (c * 3) // 4:
        return None
    slot.mul_(keep)
    where = vals.new_zeros((n, hi + 1), dtype=torch.long)
    where.scatter_(1, slot, torch.arange(vals.shape[1], device=x.device).expand(n, -1))
    where = where[:, 1:]  # candidate position of each survivor, left-aligned
    buf = vals.gather(1, where).masked_fill_(torch.arange(hi, device=x.device) >= count[:, None], float("-inf"))
    top, j = buf.topk(k, dim=1)
    p = where.gather(1, j)
    if gdim == 2:
        cols = groups.gather(1, p % k) + (p // k) * (c // g)
    else:
        cols = groups.gather(1, p // g) * g + p % g
    return top, cols


def topk_rows(x: torch.Tensor, k: int, blocked: torch.Tensor | None = None,
              max_blocked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k (values, indices) of the entries not `blocked`, sorted descending; exact.

    Why not `x.masked_fill(blocked, -inf).topk(k)`: on CPU that costs ~2.5 ms for 512 x 512 at k = 16
    (twice per CPRD step) and the masked copy another 0.3 ms. Here the top k + `max_blocked` entries
    of the raw rows are found by `_threshold_topk` and the blocked ones dropped afterwards: at most
    `max_blocked` of them can be among the raw top k + max_blocked, so the first k unblocked ones
    are the answer. Falls back to masked `topk` on GPU, for short rows or many blocked entries.
    """
    n, c = x.shape
    if blocked is not None and max_blocked is None:
        max_blocked = int(blocked.sum(1).max())
    kk = k + (max_blocked or 0) if blocked is not None else k
    out = None
    if x.device.type == "cpu" and kk <= c // 8:
        g = 16 if c % 16 == 0 and c // 16 >= 2 * kk else 8 if c % 8 == 0 else 4 if c % 4 == 0 else 0
        if g:
            out = _threshold_topk(x, kk, g)
    if out is None:
        xm = x if blocked is None else x.masked_fill(blocked, float("-inf"))
        return xm.topk(k, dim=1)
    vals, cols = out
    if blocked is None or kk == k:
        return vals, cols
    # push the blocked entries to the end, keeping the order of the others (stable sort of a 0/1 key)
    order = blocked.gather(1, cols).to(torch.uint8).sort(dim=1, stable=True).indices[:, :k]
    return vals.gather(1, order), cols.gather(1, order)


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
    n_blocked = blocked.sum(1)
    fewest, most = (int(v) for v in n_blocked.aminmax())  # one pass for the check and for topk_rows
    n_neg_min, n_neg_max = blocked.shape[1] - most, blocked.shape[1] - fewest
    if k is None:
        k = n_neg_max
    else:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive integer (negatives per anchor), got {k!r}")
        if k > n_neg_min:
            row = int(n_blocked.argmax().item())
            raise UserError(f"k={k} is larger than the number of negatives ({n_neg_min}) of anchor {row}; "
                            f"lower k to at most {n_neg_min} or use a larger batch / candidate pool")
    if k < 1:
        raise UserError("no negatives to mine: every candidate is a positive or masked out")
    values, indices = topk_rows(student_sim.detach(), k, blocked, most)  # sorted, largest first
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
