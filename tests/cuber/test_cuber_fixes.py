"""TRGP's basis growth rule, undefined correlations, and CUBER under gradient accumulation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.cuber import CUBER, TRGP, CUBERConfig, TRGPConfig, classify
from transferlab.cuber.memory import grow_basis
from transferlab.cuber.trgp import REGIME_POSITIVE, REGIME_TRUST, cosine_correlation, full_cosine, task_basis

from .test_cuber_strategies import basis, fit, task_data


def _residual(B: torch.Tensor, M: torch.Tensor) -> float:
    """||(I - QQ^T) B|| / ||B|| with Q an orthonormal basis of span(M) (float64)."""
    Q, _ = torch.linalg.qr(M.double())
    B = B.double()
    return ((B - Q @ (Q.T @ B)).norm() / B.norm().clamp_min(1e-30)).item()


def _wide_mlp():
    return nn.Sequential(nn.Linear(20, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def _task(seed, rank, n=120):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, 20, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


# ---- fix: TRGP grows the protected basis by its own selection -----------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_every_trgp_task_basis_direction_stays_protected(seed):
    torch.manual_seed(seed)
    model = _wide_mlp()
    strat = TRGP(model, TRGPConfig(thresholds=(0.9,), eps_proj=0.0, n_samples=(120,)))
    tasks = [_task(100 * seed + t, 3 + 2 * t) for t in range(4)]
    # train task by task; after task t+1 every vector of task t's own basis must lie in span(M)
    for t, (x, y) in enumerate(tasks):
        ld = [(x[i: i + 20], y[i: i + 20]) for i in range(0, len(x), 20)]
        strat.before_task(t, ld)
        opt = torch.optim.SGD(list(model.parameters()) + strat.extra_parameters(), lr=0.05)
        for i in range(20):
            xb, yb = ld[i % len(ld)]
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            strat.after_backward(model)
            opt.step()
        strat.after_task(t, ld)
        for j in range(t + 1):
            for n, B in strat.task_bases[j].items():
                assert _residual(B, strat.memory.bases[n]) <= 1e-6, (t, j, n)


def test_task_basis_rule_on_a_case_where_gpm_adds_fewer_vectors():
    # Old vectors with little of the new task's energy count fully in GPM's captured fraction but
    # rank last in TRGP's pooled selection, which therefore takes one more new direction (0.6)
    # than GPM's rule adds: growing the protected basis by GPM's rule leaves it unprotected.
    M = basis(12, 4, 7).double()
    g = torch.Generator().manual_seed(3)
    N = torch.randn(12, 6, generator=g, dtype=torch.float64)
    N = torch.linalg.qr(N - M @ (M.T @ N))[0]
    e_old = torch.tensor([10.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    e_new = torch.tensor([4.0, 2.0, 1.0, 0.6, 0.3, 0.2], dtype=torch.float64)
    A = torch.cat([M * e_old.sqrt(), N * e_new.sqrt()], 1)
    A = A @ torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0]
    B, new = task_basis(M, A, 0.9)
    grown, added = grow_basis(M, A, 0.9)
    assert (new.shape[1], added) == (4, 3)
    assert _residual(B, grown) > 1e-2  # GPM's rule: part of the task's basis is not protected
    assert _residual(B, torch.cat([M, new], 1)) <= 1e-10  # TRGP's rule: all of it is
    # the top new direction (index r_pre in the pooled list, which `sel_index > r_pre` skips) is protected
    assert _residual(N[:, :1], torch.cat([M, new], 1)) <= 1e-8


def test_first_task_basis_uses_gpms_strict_rule():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(10, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 10, dtype=torch.float64)[:, None]
    eps = 0.9
    B, new = task_basis(None, A, eps)
    M, r = grow_basis(None, A, eps)
    assert B.shape[1] == r == new.shape[1]  # the crossing vector is not kept
    assert _residual(B, M) <= 1e-10


# ---- fix: a zero gradient is never positively correlated ------------------------------------------
def test_zero_gradient_is_not_positively_correlated_at_eps_corr_zero():
    U = basis(10, 3)
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) @ U.T
    zero = torch.zeros_like(g)
    for corr in (cosine_correlation, full_cosine):
        regime, _, c = classify(g, U, 0.1, zero, 0.0, corr)
        assert regime == REGIME_TRUST and c != c  # nan: undefined, not "0 >= 0"
    # a stored gradient orthogonal to the subspace has no in-subspace direction either
    out = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    outside = out - out @ U @ U.T
    assert classify(g, U, 0.1, outside, 0.0)[0] == REGIME_TRUST
    assert classify(g, U, 0.1, 2 * g, 0.0)[0] == REGIME_POSITIVE


# ---- fix: CUBER's step once per optimizer step under gradient accumulation -----------------------
def _cuber_after_task0(rule):
    x, y = task_data(3)
    torch.manual_seed(0)
    model = _wide_mlp()
    strat = CUBER(model, CUBERConfig(thresholds=(0.99,), eps_proj=0.0, eps_corr=-1.0, rule=rule,
                                     trust_radius=0.0))
    fit(model, strat, [(x, y)], steps=5)
    strat.before_task(1, [(x, y)])
    return model, strat, x, y


@pytest.mark.parametrize("rule", ["free", "backward"])
def test_cuber_step_is_added_once_per_optimizer_step_when_accumulating(rule):
    grads = {}
    for micro in (1, 3):
        model, strat, x, y = _cuber_after_task0(rule)
        assert strat.positive, "layer 0 must be in Regime 3"
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        out = []
        for _ in range(2):  # two optimizer steps, so the accumulation window must reset
            opt.zero_grad(set_to_none=False)
            for k in range(micro):
                xb, yb = x[k::micro], y[k::micro]
                loss = F.cross_entropy(model(xb), yb, reduction="sum") / len(x)
                loss.backward()
                strat.after_backward(model)
            out.append(model[0].weight.grad.clone())
            opt.step()
        grads[micro] = out
    for a, b in zip(grads[1], grads[3]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
