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
from .kernels import argsort_rows_desc_native, topk_rows_native

VALID_RULES = ("all", "top_m", "threshold", "below_positive")
RANK_REDUCTIONS = ("mean", "sum")


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


def _threshold_topk(x: torch.Tensor, k: int, extra: int, blocked: torch.Tensor | None,
                    g: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact row-wise top-k (sorted) of the entries not `blocked`; None if the shortcut does not apply.

    Why: CPU `topk` is branchy scalar code (~10-15 ns per element on fresh data), while max, compare,
    cumsum and gather are vectorised. With kk = k + extra (extra >= the number of blocked entries in
    any row), let tau be the kk-th largest of the row's c / g group maxima. Those kk maxima are kk
    distinct entries >= tau, at most `extra` of them blocked, so the k largest unblocked entries are
    all >= tau and lie in the kk chosen groups (an entry > tau lies in a group whose max > tau, which
    is chosen; ties at tau only swap equal values). Typically ~k + 10 of the kk * g candidates pass
    `>= tau`; they are compacted to the left of a narrow buffer and only that goes through `topk`.
    """
    n, c = x.shape
    kk = k + extra
    # Group j holds the strided columns j + (c // g) * [0, g): the group max is then an elementwise max
    # of g unit-stride slabs, which vectorises (a max over contiguous runs of 8-16 floats does not).
    xv = x.view(n, g, c // g)
    if x.stride(1) == 1:
        gmax = xv.amax(1)  # [n, c // g]
    else:  # x = sim.t() (text->image): the slabs are rows of sim
        gmax = x.t().view(g, c // g, n).amax(0).t()
    gval, groups = gmax.topk(kk, dim=1, sorted=False)
    tau = gval.amin(1, keepdim=True)
    # candidates [n, g, kk]: member a of chosen group b is column groups[b] + a * (c // g)
    keep = xv.gather(2, groups[:, None, :].expand(n, g, kk)).reshape(n, g * kk) >= tau  # NaN: False
    slot = keep.cumsum(1)  # 1-based slot of each survivor; non-survivors go to slot 0 (discarded)
    count = slot[:, -1].clone()  # (a copy: slot is modified in place below)
    lo, hi = (int(v) for v in count.aminmax())
    if lo < kk or hi > (c * 3) // 4:  # NaN rows, or so many ties that the shortcut does not pay
        return None
    slot.mul_(keep)
    # the survivors' columns, left-aligned (padding: column 0); no int64 division, which is slow on CPU
    cand_cols = groups[:, None, :] + torch.arange(0, c, c // g, device=x.device)[None, :, None]
    cols = slot.new_zeros((n, hi + 1)).scatter_(1, slot, cand_cols.view(n, g * kk))[:, 1:]
    drop = torch.arange(hi, device=x.device) >= count[:, None]  # padding
    if blocked is not None:
        drop |= blocked.gather(1, cols)
    buf = x.gather(1, cols).masked_fill_(drop, float("-inf"))
    top, j = buf.topk(k, dim=1)
    return top, cols.gather(1, j)


def topk_rows(x: torch.Tensor, k: int, blocked: torch.Tensor | None = None,
              max_blocked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k (values, indices) of the entries not `blocked`, sorted descending; exact.

    Why not `x.masked_fill(blocked, -inf).topk(k)`: on CPU that costs ~2.5 ms for 512 x 512 at k = 16
    (twice per CPRD step) plus 0.3 ms for the masked copy. The C kernel (`kernels.py`, when a C
    compiler is available) and, without it, `_threshold_topk` find the same entries from the raw rows
    (`max_blocked` = the most blocked entries of any row, counted if not given). Falls back to the
    masked `topk` on GPU (where `topk` is fast), for short rows or many blocked entries.
    """
    n, c = x.shape
    extra = 0
    if blocked is not None:
        extra = int(blocked.view(torch.uint8).sum(1, dtype=torch.int32).max()) if max_blocked is None else max_blocked
    kk = k + extra
    if x.device.type == "cpu" and kk <= c // 8:
        out = topk_rows_native(x, k, blocked, extra)  # one C pass, when a C compiler is available
        if out is not None:
            return out
        g = next((g for g in (16, 8, 4) if c % g == 0 and c // g >= 2 * kk), 0)
        if g:
            # row-major x, or a transposed one (text->image: `sim.t()`), is read in place
            out = _threshold_topk(x if 1 in x.stride() else x.contiguous(), k, extra, blocked, g)
            if out is not None:
                return out
    xm = x if blocked is None else x.masked_fill(blocked, float("-inf"))
    return xm.topk(k, dim=1)


def mine_hard_negatives(student_sim: torch.Tensor, positive_mask: torch.Tensor, k: int | None,
                        candidate_mask: torch.Tensor | None = None, *,
                        positives_per_row: int | None = None, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's K most similar non-positive candidates per anchor (after the `skip` most similar).

    Args:
        student_sim: [A, C] student similarities (not modified; mining uses a detached copy).
        positive_mask: [A, C] bool, True for *every* positive of the anchor (several captions per image).
        k: negatives per anchor; None takes all of them (the `cprd_all` ablation).
        candidate_mask: optional [A, C] bool of candidates allowed at all (e.g. padding = False).
        positives_per_row: the number of positives of *every* row, when the caller has already
            established that it is one constant (e.g. from `positive_columns`); saves counting them.
        skip: the hardest negatives to pass over first; skip=K mines ranks K+1..2K (the
            easy-negatives ablation of finding 2). Needs an integer k.

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
    if positives_per_row is not None and candidate_mask is None:
        fewest = most = int(positives_per_row)
        n_blocked = None
    else:
        n_blocked = blocked.view(torch.uint8).sum(1, dtype=torch.int32)  # (a bool sum would widen to int64 first)
        fewest, most = (int(v) for v in n_blocked.aminmax())  # one pass for the check and for topk_rows
    n_neg_min, n_neg_max = blocked.shape[1] - most, blocked.shape[1] - fewest
    if not isinstance(skip, int) or skip < 0:
        raise UserError(f"skip must be a non-negative integer, got {skip!r}")
    if k is None:
        if skip:
            raise UserError("skip needs an integer k (it mines ranks skip+1..skip+k)")
        k = n_neg_max
    else:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive integer (negatives per anchor), got {k!r}")
        if k + skip > n_neg_min:
            row = 0 if n_blocked is None else int(n_blocked.argmax().item())
            what = f"k={k}" if not skip else f"k + skip = {k + skip}"
            raise UserError(f"{what} is larger than the number of negatives ({n_neg_min}) of anchor {row}; "
                            f"lower it to at most {n_neg_min} or use a larger batch / candidate pool")
    if k < 1:
        raise UserError("no negatives to mine: every candidate is a positive or masked out")
    values, indices = topk_rows(student_sim.detach(), k + skip, blocked, most)  # sorted, largest first
    if skip:
        values, indices = values[:, skip:], indices[:, skip:]
    return indices, values.abs() < float("inf")  # = isfinite (NaN too), in 2 ops instead of 4


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
    if rule == "below_positive":
        raise UserError("valid='below_positive' is not a prefix rule (the invalid candidates are the teacher's "
                        "top ones); use valid_ranks with the positive's teacher score")
    raise UserError(f"unknown validity rule {rule!r}; choose from {', '.join(VALID_RULES)}")


def valid_ranks(t_sorted: torch.Tensor, available: torch.Tensor, rule: str = "all", param: float | None = None,
                t_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[A, K] bool: which teacher-sorted candidates are valid (carry a ranking term).

    The prefix rules (`valid_prefix`) give the first J* ranks. "below_positive" marks as invalid
    every negative the teacher scores *above* the anchor's positive (`t_pos`, [A]): a likely false
    negative, whose order the student should not learn. Those sit at the top of the teacher's
    order, so they get no term and, being ranked first, never enter a valid candidate's suffix
    denominator either. Like `all` / `top_m` the rule only compares scores, so it is invariant to
    monotone transforms of the teacher.
    """
    ranks = torch.arange(t_sorted.shape[1], device=t_sorted.device)
    if rule == "below_positive":
        if t_pos is None:
            raise UserError("valid='below_positive' needs the positive's teacher score per anchor "
                            "(teacher_positive=..., or a teacher score matrix with positive_mask)")
        if tuple(t_pos.shape) != (t_sorted.shape[0],):
            raise UserError(f"teacher_positive must have shape [{t_sorted.shape[0]}] (one score per anchor), "
                            f"got {tuple(t_pos.shape)}")
        return (t_sorted <= t_pos.to(t_sorted.dtype)[:, None]) & available
    j_star = valid_prefix(t_sorted, available, rule, param)
    return (ranks[None, :] < j_star[:, None]) & available


def masked_logsumexp(x: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """logsumexp over the kept entries (-inf for a row with none), without slow exp() underflow paths.

    Why: CPU exp() of arguments below about -87 (masked or far-below-max logits) takes a scalar
    path ~20x slower than normal. Clamping x - max to [-80, 0] and multiplying by the mask is exact to
    float precision (a clamped entry would contribute < 2e-35 next to the max's 1) and fast.
    """
    if keep is None:
        m = x.detach().amax(dim, keepdim=True)
        return torch.log(torch.exp((x - m).clamp(min=-80.0)).sum(dim)) + m.squeeze(dim)
    m = x.detach().masked_fill(~keep, float("-inf")).amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # max=0 is exact for kept entries (x <= m) and keeps a dropped entry far above the kept max from
    # overflowing: exp() = inf, times keep = 0, is NaN, and a NaN poisons the gradient even where a
    # later torch.where discards this value (a CPRD step on Fashion-MNIST scenes hit exactly that)
    e = torch.exp((x - m).clamp(min=-80.0, max=0.0)) * keep
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


def _teacher_order(t: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of t descending; ties keep their column order (a stable sort).

    On CPU the C kernel (`kernels.argsort_rows_desc_native`) answers when it is built. Without it: why
    not always `stable=True`: the stable CPU sort of short rows is ~1.5x slower, and continuous teacher
    scores rarely tie. Without ties every sort gives the same order, so the stable sort runs only when a
    row has two equal scores (checked on the sorted values).
    """
    if t.device.type != "cpu":  # no host sync for the tie check on GPU, where the stable sort is cheap
        return torch.sort(t, dim=1, descending=True, stable=True).indices
    order = argsort_rows_desc_native(t)  # a C sorting network, stable by construction (~3.5x faster)
    if order is not None:
        return order
    t_sorted, order = torch.sort(t, dim=1, descending=True)
    if bool((t_sorted[:, 1:] == t_sorted[:, :-1]).any()):
        order = torch.sort(t, dim=1, descending=True, stable=True).indices
    return order


class _SuffixNLL(torch.autograd.Function):
    """sum_j w[:, j] * (log sum_{i >= j} exp(s_i) - s_j) over the teacher-sorted logits, per row.

    Why a hand-written backward: autograd would replay ~12 small [A, K] ops (gather, flip, cumsum,
    exp, log, where ...) and scatter the gradient through the gather. The gradient is one reversed
    cumulative sum: d/ds_k = exp(s_k - m) * sum_{j <= k} w_j / suffix_j - w_k, with suffix_j the
    sum of exp(s - m) from rank j on. Only used when every row's logits span < 80, where exp(s - m)
    is exact (see `suffix_logsumexp`), and without padding; otherwise `partial_ranking_nll` runs the
    same formula through autograd.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, order: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ss = s.gather(1, order)
        m = ss.amax(1, keepdim=True)
        e = (ss - m).exp_()
        suffix = e.flip(1).cumsum(1).flip(1)
        terms = suffix.log().add_(m).sub_(ss)
        ctx.save_for_backward(order, w, e, suffix)
        return (terms.mul_(w)).sum(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        order, w, e, suffix = ctx.saved_tensors
        wg = w * g[:, None]
        grad_sorted = (wg / suffix).cumsum(1).mul_(e).sub_(wg)
        return torch.empty_like(grad_sorted).scatter_(1, order, grad_sorted), None, None


def partial_ranking_nll(s: torch.Tensor, t: torch.Tensor, *, valid: str = "all", valid_param: float | None = None,
                        available: torch.Tensor | None = None, reduction: str = "mean",
                        t_pos: torch.Tensor | None = None, rank_reduction: str = "mean") -> torch.Tensor:
    """Truncated Plackett-Luce NLL of the teacher's order of each row's candidates.

    Args:
        s: [A, K] student logits (similarity / tau), differentiable.
        t: [A, K] teacher scores of the same candidates (detached here).
        available: [A, K] bool, False for padding slots (they sort last and carry no term).
        t_pos: [A] teacher score of each anchor's positive (needed by valid="below_positive").
        rank_reduction: "mean" (a row's loss is the mean of its rank terms) or "sum" (their sum, the
            survey formula; with K negatives it weighs the term up to K - 1 times more).

    Per row: sort by t (descending, stable), mark the valid ranks (`valid_ranks`); for each valid
    rank j that has at least one candidate below it, the term is logsumexp(s_j..s_K) - s_j. A row
    with no term has loss 0 (never NaN).
    """
    if rank_reduction not in RANK_REDUCTIONS:
        raise UserError(f"rank_reduction must be mean or sum, got {rank_reduction!r}")
    if valid not in VALID_RULES:
        raise UserError(f"unknown validity rule {valid!r}; choose from {', '.join(VALID_RULES)}")
    t = t.detach().to(s.dtype)
    if t_pos is not None:
        t_pos = t_pos.detach().to(s.dtype)
    k = s.shape[1]
    mean = rank_reduction == "mean"
    full = available is None or bool(available.all())
    if full:
        sd = s.detach()
        if bool(((sd.amax(1) - sd.amin(1)) < 80).all()):  # the common case: one fused op, see _SuffixNLL
            order = _teacher_order(t)
            if valid in ("threshold", "below_positive"):
                t_sorted = t.gather(1, order)
                use = valid_ranks(t_sorted, torch.ones_like(t_sorted, dtype=torch.bool), valid, valid_param, t_pos)
                use[:, k - 1] = False  # the last candidate has nothing below it
                w = use / use.sum(1, keepdim=True).clamp(min=1) if mean else use.to(s.dtype)
            else:  # J* is the same for every row: one weight row, broadcast
                n_use = k - 1 if valid == "all" else min(
                    int(valid_prefix(None, torch.ones(1, k, dtype=torch.bool), valid, valid_param)), k - 1)
                w = s.new_zeros(1, k)
                w[:, :n_use] = 1.0 / max(n_use, 1) if mean else 1.0
            return _reduce(_SuffixNLL.apply(s, order, w), reduction)
    if available is None:
        available = torch.ones_like(s, dtype=torch.bool)
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
    n_avail = avail_sorted.sum(1)
    ranks = torch.arange(k, device=s.device)
    # the last available candidate has nothing below it: its term is log(1) = 0, so it is not counted
    use = valid_ranks(t_sorted, avail_sorted, valid, valid_param, t_pos) & (ranks[None, :] < (n_avail - 1)[:, None])
    terms = torch.where(use, terms, torch.zeros_like(terms))
    per_row = terms.sum(1) / use.sum(1).clamp(min=1) if mean else terms.sum(1)
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
              candidate_mask: torch.Tensor | None = None, reduction: str = "mean",
              teacher_positive: torch.Tensor | None = None, rank_reduction: str = "mean",
              skip: int = 0) -> torch.Tensor:
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
        teacher_positive: [A] teacher score of each anchor's positive, for valid="below_positive"
            when teacher_scores is [A, K]; with an [A, C] matrix it is the best positive's score.
        rank_reduction: "mean" or "sum" over a row's rank terms (see `partial_ranking_nll`).
        skip: mine ranks skip+1..skip+K of the student's negatives instead of the top K.

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
        hard_idx, available = mine_hard_negatives(student_sim, positive_mask, k, candidate_mask, skip=skip)
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
    t_pos = teacher_positive
    if valid == "below_positive" and t_pos is None:
        if tuple(teacher_scores.shape) != tuple(student_sim.shape):
            raise UserError("valid='below_positive' with [A, K] teacher scores needs teacher_positive [A]")
        t_pos = teacher_scores.detach().masked_fill(~positive_mask.bool(), float("-inf")).amax(1)
    s = student_sim.gather(1, hard_idx) / tau
    return partial_ranking_nll(s, t, valid=valid, valid_param=valid_param, available=available, reduction=reduction,
                               t_pos=t_pos, rank_reduction=rank_reduction)


def positive_columns(positive_mask: torch.Tensor) -> torch.Tensor | None:
    """[A, P] column indices of each row's positives if every row has the same number P >= 1, else None.

    Why nonzero() and not a row count: on CPU, `sum` first converts the whole [A, C] mask to a wider
    integer type, and that fresh buffer (page faults included) costs several times the reduction.
    """
    pos = positive_mask.bool()
    a = pos.shape[0]
    nz = pos.nonzero()  # row-major: each row's positives together, in column order
    if a == 0 or len(nz) == 0 or len(nz) % a:
        return None
    p = len(nz) // a
    if not bool((nz[:, 0].view(a, p) == torch.arange(a, device=pos.device)[:, None]).all()):
        return None
    return nz[:, 1].reshape(a, p)


def infonce_loss(sim: torch.Tensor, positive_mask: torch.Tensor, tau: float | torch.Tensor,
                 candidate_mask: torch.Tensor | None = None, reduction: str = "mean",
                 positive_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE per row: -log( sum_pos exp(s/tau) / sum_all exp(s/tau) ).

    Why two paths: when every row has the same number P of positives (P = 1: one caption per image,
    or the text->image side of several captions per image) they are gathered (`positive_idx`, from
    `positive_columns`) and the loss is `F.cross_entropy` (P = 1) or two plain logsumexps: about half
    the time of the masked [A, C] path, which is kept for ragged positives and candidate masks. The
    benchmark `cprd-loss` uses this as its InfoNCE baseline, so a slow baseline cannot flatter CPRD.
    """
    logits = sim / tau
    if candidate_mask is None:
        idx = positive_columns(positive_mask) if positive_idx is None else positive_idx
        if idx is not None:
            if idx.shape[1] == 1:
                per_row = F.cross_entropy(logits, idx[:, 0], reduction="none")
            else:
                per_row = torch.logsumexp(logits, 1) - torch.logsumexp(logits.gather(1, idx), 1)
            return _reduce(per_row, reduction)
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
