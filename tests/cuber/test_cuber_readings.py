"""CUBER's alternative Regime-3 readings (a) backward, (b) share_q, (c) full-space correlation."""

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.errors import UserError
from transferlab.cuber import CUBER, CUBERConfig, classify
from transferlab.cuber.trgp import REGIME_POSITIVE, REGIME_TRUST, backward_step, cosine_correlation, full_cosine

from .test_cuber_strategies import basis, fit, mlp, task_data


# ---- (a) explicit backward step on hand-built gradients ------------------------------------------
def test_backward_step_lowers_both_first_order_losses():
    U = basis(8, 3, 4)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(5, 8, generator=gen)  # new task's gradient (full layer)
    h = (g + 0.5 * torch.randn(5, 8, generator=gen)) @ U @ U.T  # old task's in-subspace gradient, correlated
    assert (h * g).sum() > 0
    d = backward_step(g, [h], [h], scale=0.5)
    assert torch.allclose(d, 0.5 * h)
    W = torch.randn(5, 8, generator=gen)
    W2 = W - 0.01 * d  # SGD step; linear losses <g, W> and <h, W> are the first-order models
    assert (g * W2).sum() < (g * W).sum() and (h * W2).sum() < (h * W).sum()
    # an old task whose loss would rise: no step (new task's loss would rise along -h)
    assert backward_step(g, [-h], [-h]).abs().sum() == 0
    # a third old task that conflicts with the step blocks it
    assert backward_step(g, [h], [h, -h]).abs().sum() == 0


# ---- (c) correlation in the full layer space ----------------------------------------------------
def test_full_space_correlation_differs_from_subspace_cosine():
    U = basis(10, 3)
    out = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    inside = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)) @ U.T
    outside = out - out @ U @ U.T
    g_new, g_old = inside + outside, inside - 5 * outside  # agree in span(U), disagree outside
    assert cosine_correlation(g_new, g_old, U) == pytest.approx(1.0, abs=1e-5)
    assert full_cosine(g_new, g_old, U) < 0
    assert classify(g_new, U, 0.1, g_old, 0.0, cosine_correlation)[0] == REGIME_POSITIVE
    assert classify(g_new, U, 0.1, g_old, 0.0, full_cosine)[0] == REGIME_TRUST


def test_cuber_uses_the_configured_correlation_space():
    x, y = task_data(6)
    torch.manual_seed(0)
    strat = CUBER(mlp(), CUBERConfig(thresholds=(0.99,), eps_proj=0.0, eps_corr=0.0, corr_space="full"))
    fit(strat.model, strat, [(x, y)], steps=5)
    g = torch.randn_like(strat.task_grads[0]["0"])
    U = strat.task_bases[0]["0"]
    assert strat._regime("0", 0, g)[2] == pytest.approx(full_cosine(g, strat.task_grads[0]["0"], U), abs=1e-6)
    with pytest.raises(UserError, match="corr_space"):
        CUBERConfig(corr_space="weights")
    with pytest.raises(UserError, match="scale_regime3"):
        CUBERConfig(rule="share_q", scale_regime3=False)


# ---- (b) old task adopts the correlated new task's scaling --------------------------------------
def test_share_q_gradient_is_exact_and_shared_scaling_lowers_old_loss():
    x, y = task_data(7)
    torch.manual_seed(0)
    model = mlp()
    strat = CUBER(model, CUBERConfig(thresholds=(0.99,), eps_proj=0.0, eps_corr=-1.0, rule="share_q",
                                     step_scale=0.2, grad_samples=120))
    fit(model, strat, [(x, y)], steps=5)  # under-trained task 0
    # the stored dL_0/dQ equals U^T W^T g_0 U for a layer without scalings (g_0 = stored weight gradient)
    for n, mod in strat.memory.modules.items():
        U, W = strat.task_bases[0][n], mod.weight.detach().reshape(mod.weight.shape[0], -1)
        want = U.T @ W.T @ strat.task_grads[0][n] @ U
        assert torch.allclose(strat.q_grads[0][n], want, atol=1e-5 * max(want.abs().max().item(), 1e-3))
    strat.use_task(0)
    with torch.no_grad():
        loss_before = F.cross_entropy(model(x), y).item()
    w_before = model[0].weight.detach().clone()
    M = strat.memory.bases["0"].clone()
    fit_one = [(x, y)]  # the "new" task is the same data: positively correlated by construction
    strat.before_task(1, fit_one)
    assert all(r[1] == REGIME_POSITIVE for r in strat.regimes[1]["0"])
    strat.use_task(1)
    opt = torch.optim.SGD(list(model.parameters()) + strat.extra_parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        strat.after_backward(model)
        opt.step()
    strat.after_task(1, fit_one)
    shared = [(n, Q) for n, qs in strat.scales[0].items() for j, Q in qs if j == 0]
    assert shared, "task 0 must adopt task 1's scaling on its own subspace"
    for n, Q in shared:  # adopted only where it lowers task 0's first-order loss
        assert (strat.q_grads[0][n] * (Q - torch.eye(Q.shape[0]))).sum() < 0
    assert ((model[0].weight.detach() - w_before) @ M).norm() < 1e-4  # shared weights: GPM as usual
    strat.use_task(0)
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < loss_before


def test_share_q_rejects_an_ascent_scaling():
    x, y = task_data(8)
    torch.manual_seed(0)
    strat = CUBER(mlp(), CUBERConfig(thresholds=(0.99,), eps_proj=0.0, eps_corr=-1.0, rule="share_q"))
    fit(strat.model, strat, [(x, y)], steps=5)
    n, g = "0", strat.q_grads[0]["0"]
    eye = torch.eye(g.shape[0])
    for sign, adopted in ((1.0, 0), (-1.0, 1)):  # Q_t0 - I along +dL_0/dQ raises task 0's loss: rejected
        strat.scales[0] = {}
        strat.scales[5] = {n: [(0, eye + sign * 0.1 * g)]}
        strat.regimes[5] = {n: [(0, REGIME_POSITIVE, 1.0, 1.0)]}
        strat._share_scales(5)
        assert len(strat.scales[0].get(n, [])) == adopted
    strat.regimes[5] = {n: [(0, REGIME_TRUST, 1.0, float("nan"))]}  # not positively correlated: never shared
    strat.scales[0] = {}
    strat._share_scales(5)
    assert not strat.scales[0]
