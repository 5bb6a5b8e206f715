"""CPRD's CPU fast paths compute exactly what the plain formulas compute.

`topk_rows` (the C kernel, and the PyTorch threshold + compaction path used without a compiler),
InfoNCE's gathered-positive path, `_teacher_order` (unstable sort unless ties) and `_SuffixNLL`
(hand-written backward of the partial-ranking NLL) exist only for speed (benchmark `cprd-loss`);
each is checked here against the direct computation, values and gradients.
"""

import pytest
import torch

import transferlab.cprd.loss as L
from transferlab.cprd import cprd_loss, kernels, mine_hard_negatives
from transferlab.cprd.loss import partial_ranking_nll


def masked_topk(x, k, blocked):
    return (x if blocked is None else x.masked_fill(blocked, float("-inf"))).topk(k, dim=1)


def _require_kernels():
    if not kernels.available():
        pytest.skip("no C compiler: the C kernels are not built")


@pytest.fixture(params=["native", "torch"])
def count_fast(request, monkeypatch):
    """Counts how often the fast path under test answered (so a test cannot pass on the fallback alone).

    "native": the C kernel (skipped without a C compiler); "torch": the PyTorch shortcut, with C disabled.
    """
    calls = {"fast": 0, "fallback": 0}
    if request.param == "native":
        _require_kernels()
        real, name = kernels.topk_rows_native, "topk_rows_native"
    else:
        monkeypatch.setattr(L, "topk_rows_native", lambda *a: None)
        real, name = L._threshold_topk, "_threshold_topk"

    def spy(*a):
        out = real(*a)
        calls["fast" if out is not None else "fallback"] += 1
        return out

    monkeypatch.setattr(L, name, spy)
    return calls


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_rows_equals_masked_topk(count_fast, transposed, ties):
    g = torch.Generator().manual_seed(10 + 2 * transposed + ties)
    for n, c, k, p_block in [(40, 512, 16, 0.003), (33, 256, 5, 0.02), (8, 1024, 30, 0.0), (64, 96, 3, 0.01)]:
        base = torch.randn(c, n, generator=g) if transposed else torch.randn(n, c, generator=g)
        x = base.t() if transposed else base
        if ties:
            x = (x * 2).round() / 2  # few distinct values: many ties, also at the threshold
        blocked = torch.rand(n, c, generator=g) < p_block
        blocked[torch.arange(n), torch.arange(n) % c] = True  # at least one positive per row
        v, i = L.topk_rows(x, k, blocked)
        rv, _ = masked_topk(x, k, blocked)
        assert torch.equal(v, rv)  # same values in the same (descending) order
        assert torch.equal(x.gather(1, i), v) and not blocked.gather(1, i).any()
        assert all(len(set(r)) == k for r in i.tolist())
    assert count_fast["fast"] >= 3  # the shortcut itself was tested, not only the fallback


@pytest.mark.parametrize("native", [True, False])
def test_topk_rows_nan_and_inf_rows(native, monkeypatch):
    if not native:
        monkeypatch.setattr(L, "topk_rows_native", lambda *a: None)
    x = torch.randn(16, 512)
    x[2, 7] = float("nan")  # topk ranks NaN first; the shortcut cannot, so it falls back
    x[5, :500] = float("-inf")
    v, i = L.topk_rows(x, 16)
    rv, ri = x.topk(16, dim=1)
    assert torch.equal(v.isnan(), rv.isnan()) and torch.equal(v[~v.isnan()], rv[~rv.isnan()])
    assert torch.equal(x.gather(1, i)[5], rv[5])


def test_native_topk_declines_what_it_cannot_rank():
    _require_kernels()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(32, 512, generator=g)
    x[5, :500] = float("-inf")  # -inf entries are ranked like topk ranks them
    v, _ = kernels.topk_rows_native(x, 16, None, 0)
    assert torch.equal(v, x.topk(16, dim=1).values)
    y = x.clone()
    y[3, 300] = float("nan")  # NaN in a later group slab: a max would hide it, the kernel must not
    assert kernels.topk_rows_native(y, 16, None, 0) is None
    assert kernels.topk_rows_native(y.t().contiguous().t(), 16, None, 0) is None
    blocked = torch.zeros(32, 512, dtype=torch.bool)
    blocked[7, 10:] = True  # row 7 keeps 10 candidates < k
    assert kernels.topk_rows_native(x, 16, blocked, 502) is None
    # a view that is neither row- nor column-contiguous is copied first
    z = torch.randn(32, 1024, generator=g)[:, ::2]
    assert torch.equal(kernels.topk_rows_native(z, 8, None, 0)[0], z.topk(8, dim=1).values)


def test_mining_with_several_positives_matches_masked_topk():
    torch.manual_seed(11)
    img, caps = 100, 5  # COCO-style: 5 captions per image, all positives
    sim = torch.randn(img, img * caps)
    pos = torch.zeros(img, img * caps, dtype=torch.bool)
    pos[torch.arange(img).repeat_interleave(caps), torch.arange(img * caps)] = True
    for s, p in ((sim, pos), (sim.t(), pos.t())):
        idx, avail = mine_hard_negatives(s, p, 16)
        assert avail.all() and not p.gather(1, idx).any()
        assert torch.equal(s.gather(1, idx), masked_topk(s, 16, p).values)


@pytest.mark.parametrize("native", [True, False])
def test_teacher_order_is_stable_under_ties(native, monkeypatch):
    if native:
        _require_kernels()
    if not native:
        monkeypatch.setattr(L, "argsort_rows_desc_native", lambda t: None)
    torch.manual_seed(12)
    for width in (16, 64):  # (an unstable CPU sort already reorders ties at width 64)
        t = torch.randint(0, 3, (200, width)).float()  # many ties: the stable sort must run
        assert torch.equal(L._teacher_order(t), torch.sort(t, dim=1, descending=True, stable=True).indices)
    t = torch.rand(200, 16)
    assert torch.equal(L._teacher_order(t), torch.sort(t, dim=1, descending=True, stable=True).indices)


def reference_nll(s, t, n_valid=None, threshold=None):
    """Plain autograd formula: sort by teacher (stable), per-rank logsumexp over the suffix, mean per row."""
    order = torch.sort(t, dim=1, descending=True, stable=True).indices
    ss, ts = s.gather(1, order), t.gather(1, order)
    rows = []
    for r in range(s.shape[0]):
        j_star = s.shape[1] if n_valid is None else n_valid
        if threshold is not None:
            j_star = int((ts[r] >= threshold).sum())
        terms = [torch.logsumexp(ss[r, j:], 0) - ss[r, j] for j in range(min(j_star, s.shape[1] - 1))]
        rows.append(torch.stack(terms).mean() if terms else ss.new_zeros(()))
    return torch.stack(rows)


@pytest.mark.parametrize("valid,param", [("all", None), ("top_m", 4), ("threshold", 0.5)])
def test_fused_partial_ranking_values_and_gradients(valid, param):
    torch.manual_seed(13)
    s = (torch.randn(30, 9) * 3).requires_grad_()
    t = torch.rand(30, 9)
    w = torch.rand(30)  # a non-uniform upstream gradient
    (partial_ranking_nll(s, t, valid=valid, valid_param=param, reduction="none") * w).sum().backward()
    fast_grad = s.grad.clone()
    s.grad = None
    ref = reference_nll(s, t, n_valid=param if valid == "top_m" else None,
                        threshold=param if valid == "threshold" else None)
    (ref * w).sum().backward()
    out = partial_ranking_nll(s, t, valid=valid, valid_param=param, reduction="none")
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(fast_grad, s.grad, atol=1e-5)


def test_fused_backward_gradcheck():
    torch.manual_seed(14)
    s = torch.randn(6, 7, dtype=torch.double, requires_grad=True)
    order = torch.sort(torch.rand(6, 7), dim=1, descending=True).indices
    w = torch.zeros(1, 7, dtype=torch.double)
    w[:, :6] = 1 / 6
    assert torch.autograd.gradcheck(lambda x: L._SuffixNLL.apply(x, order, w), (s,))


def test_wide_logit_range_takes_the_exact_slow_path():
    # logits spanning > 80 (tau 0.01, cosines in [-1, 1]) skip the fused path; both agree with the formula
    torch.manual_seed(15)
    sim = (torch.rand(12, 40) * 2 - 1).requires_grad_()
    t = torch.rand(12, 40)
    pos = torch.eye(12, 40, dtype=torch.bool)
    loss = cprd_loss(sim, t, pos, k=8, tau=0.01)
    loss.backward()
    idx, _ = mine_hard_negatives(sim, pos, 8)
    s = (sim.detach().gather(1, idx) / 0.01).requires_grad_()
    assert loss.item() == pytest.approx(reference_nll(s, t.gather(1, idx)).mean().item(), rel=1e-5)
    assert torch.isfinite(sim.grad).all()


def test_a_dropped_entry_far_above_the_kept_ones_leaves_loss_and_gradient_finite():
    # teacher order 100, -60, 5 (last slot is padding): the suffix from rank 1 keeps {-60, 5} while the
    # dropped 100 lies 95 above their max -- exp() of that overflowed, and inf * 0 made the value NaN
    s = torch.tensor([[100.0, -60.0, 5.0, -70.0]], requires_grad=True)
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    available = torch.tensor([[True, True, True, False]])
    loss = partial_ranking_nll(s, t, available=available)
    loss.backward()
    sd = s.detach().double()[0, :3]
    ref = ((torch.logsumexp(sd, 0) - sd[0]) + (torch.logsumexp(sd[1:], 0) - sd[1])) / 2
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert s.grad[0, 3] == 0  # padding gets no gradient


def _infonce_reference(sim, pos, tau):
    """-log(sum_pos exp(s/tau) / sum_all exp(s/tau)), one row at a time."""
    rows = [torch.logsumexp(sim[i] / tau, 0) - torch.logsumexp(sim[i][pos[i]] / tau, 0) for i in range(len(sim))]
    return torch.stack(rows)


@pytest.mark.parametrize("layout", ["one", "permutation", "five_each", "ragged"])
def test_infonce_gathered_positives_equal_the_masked_formula(layout):
    """The gathered path (same number of positives per row) and the masked path give the same loss and gradient."""
    g = torch.Generator().manual_seed(3)
    n, c = 12, 60
    pos = torch.zeros(n, c, dtype=torch.bool)
    if layout == "one":
        pos[torch.arange(n), torch.randint(0, c, (n,), generator=g)] = True
    elif layout == "permutation":
        n = c = 12
        pos = torch.eye(n, dtype=torch.bool)[torch.randperm(n, generator=g)]
    elif layout == "five_each":
        pos[torch.arange(n)[:, None], torch.randperm(c, generator=g)[:5 * n].view(n, 5)] = True
    else:
        pos = torch.rand(n, c, generator=g) < 0.1
        pos[:, 0] = True
    expected_gathered = layout != "ragged"
    assert (L.positive_columns(pos) is not None) == expected_gathered
    sim = torch.randn(n, c, generator=g).requires_grad_()
    fast = L.infonce_loss(sim, pos, 0.05, reduction="none")
    masked = L.infonce_loss(sim, pos, 0.05, candidate_mask=torch.ones_like(pos), reduction="none")
    ref = _infonce_reference(sim, pos, 0.05)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, ref, rtol=1e-5, atol=1e-5)
    g_fast, = torch.autograd.grad(fast.sum(), sim)
    g_ref, = torch.autograd.grad(ref.sum(), sim)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)  # logits up to ~60 at tau 0.05


def test_symmetric_infonce_inverts_a_permutation_of_positives():
    """CPRDLoss's InfoNCE takes the text->image positives as the inverse permutation; it must equal the formula."""
    from transferlab.cprd.model import InfoNCELoss

    g = torch.Generator().manual_seed(4)
    pos = torch.eye(9, dtype=torch.bool)[torch.randperm(9, generator=g)]
    sim = torch.randn(9, 9, generator=g)
    out = InfoNCELoss()(sim, pos, tau=0.1)["loss"]
    ref = 0.5 * (_infonce_reference(sim, pos, 0.1).mean() + _infonce_reference(sim.t(), pos.t(), 0.1).mean())
    torch.testing.assert_close(out, ref)


def test_native_argsort_matches_stable_sort_and_declines_nan():
    _require_kernels()
    g = torch.Generator().manual_seed(14)
    for k in (1, 2, 5, 16, 17, 64):  # 17: padding to the next power of two
        t = torch.randn(100, k, generator=g).round()  # many ties
        t[0, 0], t[1, -1] = float("-inf"), float("inf")
        assert torch.equal(kernels.argsort_rows_desc_native(t),
                           torch.sort(t, dim=1, descending=True, stable=True).indices)
    t[5, 0] = float("nan")
    assert kernels.argsort_rows_desc_native(t) is None
    assert kernels.argsort_rows_desc_native(torch.randn(4, 65)) is None  # long rows: torch.sort
