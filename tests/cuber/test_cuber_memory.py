"""GPM memory: basis properties, solvers, projection orthogonality, invariance of old outputs, im2col, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import UserError
from transferlab.cuber import GPM, GPMConfig, GradientProjectionMemory, grow_basis, im2col, principal_angle_max
from transferlab.cuber.layer import projected_linear
from transferlab.cuber.models import MultiHeadCNN, multihead_forward


def low_rank(n, d, r, seed, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
    z = torch.randn(n, r, generator=g) * (decay ** torch.arange(r, dtype=torch.float32))
    return z @ P.T, P


def mlp(d=32, h=24, c=5):
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, h, bias=False), nn.ReLU(),
                         nn.Linear(h, c, bias=False))


def loader(x, y, bs=20):
    return [(x[i: i + bs], y[i: i + bs]) for i in range(0, len(x), bs)]


def train(model, strategy, x, y, task_id, steps=30, lr=0.1):
    strategy.before_task(task_id, loader(x, y))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(steps):
        b = slice((i * 20) % len(x), (i * 20) % len(x) + 20)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        strategy.after_backward(model)
        opt.step()
    strategy.after_task(task_id, loader(x, y))


# ---- basis ---------------------------------------------------------------------------------------
def test_basis_is_orthonormal_grows_and_captures_energy():
    A1, _ = low_rank(200, 40, 10, 0)
    A2, _ = low_rank(200, 40, 10, 1)
    M, r1 = grow_basis(None, A1.T, 0.97)
    assert torch.allclose(M.T @ M, torch.eye(r1, dtype=M.dtype), atol=1e-10)
    captured = ((M.T @ A1.T.double()) ** 2).sum() / (A1.double() ** 2).sum()
    # first task: the vector crossing eps is excluded, so the kept energy is just below eps
    assert 0.80 < captured < 0.97
    M2, r2 = grow_basis(M, A2.T, 0.97)
    assert M2.shape[1] == r1 + r2 and r2 > 0 and M2.shape[1] <= 40
    assert torch.allclose(M2.T @ M2, torch.eye(M2.shape[1], dtype=M2.dtype), atol=1e-10)
    cap2 = ((M2.T @ A2.T.double()) ** 2).sum() / (A2.double() ** 2).sum()
    assert cap2 >= 0.97 - 1e-9  # later tasks: vectors are added until eps is reached


@pytest.mark.parametrize("solver", ["svd", "lowrank"])
def test_eigh_matches_svd_and_lowrank(solver):
    A1, _ = low_rank(300, 64, 12, 2)
    A2, _ = low_rank(300, 64, 12, 3)
    Me, re = grow_basis(None, A1.T, 0.95, "eigh")
    Ms, rs = grow_basis(None, A1.T, 0.95, solver, q=30)
    assert re == rs and principal_angle_max(Me, Ms) < 1e-4
    Me2, _ = grow_basis(Me, A2.T, 0.95, "eigh")
    Ms2, _ = grow_basis(Ms, A2.T, 0.95, solver, q=30)
    assert Me2.shape == Ms2.shape and principal_angle_max(Me2, Ms2) < 1e-4


def test_dual_gram_path_for_wide_inputs():
    A, _ = low_rank(30, 200, 8, 4)  # m = 200 > n = 30 columns: the n x n Gram is used
    Me, re = grow_basis(None, A.T, 0.99, "eigh")
    Ms, rs = grow_basis(None, A.T, 0.99, "svd")
    assert re == rs and principal_angle_max(Me, Ms) < 1e-6


# ---- projection -----------------------------------------------------------------------------------
def test_projected_gradients_are_orthogonal_to_bases():
    torch.manual_seed(0)
    model = mlp()
    strat = GPM(model, GPMConfig(thresholds=(0.97,)))
    xa, _ = low_rank(200, 32, 6, 5)
    ya = torch.randint(0, 5, (200,))
    train(model, strat, xa, ya, 0)
    xb, _ = low_rank(200, 32, 6, 6)
    strat.before_task(1, loader(xb, ya))
    assert strat.fast == set(strat.memory.names)  # bias-free Linear: input-side projection
    model.zero_grad()
    F.cross_entropy(model(xb), ya).backward()
    strat.after_backward(model)
    for n in strat.memory.names:
        g = strat.memory.modules[n].weight.grad
        M = strat.memory.bases[n]
        assert M.shape[1] > 0
        assert (g @ M).norm() <= 1e-6 * g.norm()


def test_input_side_projection_equals_weight_gradient_projection():
    torch.manual_seed(0)
    x = torch.randn(10, 50, requires_grad=True)
    w = torch.randn(20, 50, requires_grad=True)
    M = torch.linalg.qr(torch.randn(50, 30))[0]
    for mode, B in [("sub", M), ("keep", torch.linalg.qr(M, mode="complete")[0][:, 30:])]:
        y = projected_linear(x, w, (mode, B))
        gw, gx = torch.autograd.grad((y**2).sum(), (w, x))
        w2 = w.detach().clone().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        gw_ref, gx_ref = torch.autograd.grad((F.linear(x2, w2) ** 2).sum(), (w2, x2))
        assert torch.allclose(gw, gw_ref - gw_ref @ M @ M.T, atol=1e-4)
        assert torch.allclose(gx, gx_ref, atol=1e-5)  # the input gradient is untouched


def test_training_new_task_keeps_old_in_span_outputs():
    torch.manual_seed(0)
    model = mlp()
    strat = GPM(model, GPMConfig(thresholds=(0.999,)))
    xa, _ = low_rank(300, 32, 6, 7)
    ya = torch.randint(0, 5, (300,))
    train(model, strat, xa, ya, 0)
    reps = strat.representations(0, loader(xa, ya))  # each layer's inputs on task 0 (m x n)
    old_in = {n: strat.memory.bases[n] @ (strat.memory.bases[n].T @ A) for n, A in reps.items()}  # in-span part
    w_before = {n: strat.memory.modules[n].weight.detach().clone() for n in reps}
    with torch.no_grad():
        net_before = model(xa).clone()
    xb = torch.randn(300, 32)  # a full-rank new task: unconstrained training would move everything
    train(model, strat, xb, torch.randint(0, 5, (300,)), 1, steps=60, lr=0.2)
    for n, X in old_in.items():
        w = strat.memory.modules[n].weight.detach()
        assert (w - w_before[n]).norm() > 1e-2 * w.norm()  # the layer did learn the new task
        assert ((w - w_before[n]) @ X).norm() <= 1e-3 * (w_before[n] @ X).norm()
    with torch.no_grad():  # end to end, on the raw old inputs (0.1% energy left out per layer)
        assert (model(xa) - net_before).norm() <= 0.05 * net_before.norm()


# ---- convolutions ------------------------------------------------------------------------------
def test_im2col_matches_conv_and_conv_projection_protects_old_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    cols = im2col(conv, x)  # (27, 2 * 25)
    out = conv(x).permute(1, 0, 2, 3).reshape(4, -1)
    assert torch.allclose(conv.weight.view(4, -1) @ cols, out, atol=1e-5)

    model = MultiHeadCNN(2, 2, width=4, hidden=16)
    strat = GPM(model, GPMConfig(thresholds=(0.99,), n_samples=(20, 20, 20)), forward=multihead_forward)
    assert strat.memory.names == ["body.0", "body.4", "body.9"]
    xa, ya = torch.rand(40, 1, 28, 28), torch.randint(0, 2, (40,))
    strat.before_task(0, loader(xa, ya))
    strat.after_task(0, loader(xa, ya))
    strat.before_task(1, loader(xa, ya))
    model.zero_grad()
    F.cross_entropy(model(torch.rand(20, 1, 28, 28), 1), ya[:20]).backward()
    strat.after_backward(model)
    conv2 = model.body[4]
    M = strat.memory.bases["body.4"]
    g = conv2.weight.grad.view(conv2.weight.shape[0], -1)
    assert M.shape[1] > 0 and (g @ M).norm() <= 1e-6 * g.norm()
    # BN affine parameters (1-D) are frozen after task 0
    assert model.body[1].weight.grad.abs().sum() == 0


# ---- bad input ------------------------------------------------------------------------------------
def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UserError, match="'1' is a BatchNorm1d"):
        GradientProjectionMemory(model, layers=["1"])
    with pytest.raises(UserError, match="groups"):
        GradientProjectionMemory(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), layers=["0"])
    with pytest.raises(UserError, match="no nn.Linear"):
        GradientProjectionMemory(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("eps", [0.0, 1.0, 1.5, -0.1])
def test_threshold_outside_unit_interval(eps):
    with pytest.raises(UserError, match="between 0 and 1"):
        GPMConfig(thresholds=(eps,))
    with pytest.raises(UserError, match="between 0 and 1"):
        GradientProjectionMemory(mlp(), thresholds=eps)


def test_empty_task_loader():
    model = mlp()
    strat = GPM(model)
    with pytest.raises(UserError, match="empty"):
        strat.before_task(0, [])
    with pytest.raises(UserError, match="no samples"):
        strat.after_task(0, iter([]))
    assert strat.memory.bases == {}  # nothing half-written


def test_cached_projected_inputs_give_the_same_training_as_per_step_projection():
    from transferlab.cuber.streams import permuted_stream
    from transferlab.cuber.train import run_stream
    from transferlab.nn import MLP

    tasks = permuted_stream(3, n_train=120, n_test=30)
    out = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = MLP(784, (16, 16), 10, bias=False)
        strat = GPM(model, GPMConfig(thresholds=(0.9, 0.95, 0.95), n_samples=(60,), input_cache=cache))
        res = run_stream(model, strat, tasks, lr=0.05, epochs=2, batch_size=16, seed=0)
        out[cache] = (res["R"], [p.detach().clone() for p in model.parameters()])
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][1], out[False][1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_cached_projection_is_orthogonal_and_checks_shapes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    strat = GPM(model, GPMConfig(thresholds=(0.9,), input_cache=True))
    x = torch.randn(50, 4) @ torch.randn(4, 12)
    strat.before_task(0, [(x, None)])
    strat.after_task(0, [(x, None)])
    strat.before_task(1, [(x, None)])
    xp = strat.project_inputs(x)
    M = strat.memory.bases["0"]
    assert (xp @ M).norm() <= 1e-4 * x.norm()
    strat.feed_projected(xp[:10])
    model(x[:10]).sum().backward()
    strat.after_backward(model)
    assert (model[0].weight.grad @ M).norm() <= 1e-4 * model[0].weight.grad.norm()
    strat.feed_projected(xp[:5])
    with pytest.raises(ValueError, match="cached projected input"):
        model(x[:10])


def test_wide_batches_fall_back_to_weight_gradient_projection_and_stay_projected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    strat = GPM(model, GPMConfig(thresholds=(0.9,)))
    x = torch.randn(60, 4) @ torch.randn(4, 12)
    strat.before_task(0, [(x, None)])
    strat.after_task(0, [(x, None)])
    strat.before_task(1, [(x, None)])
    patch = strat.patches["0"]
    strat.after_backward(model)  # resets the flags the set-up forwards left
    model(x[:4]).sum().backward()  # 4 rows <= 6 outputs: projected inside backward
    assert not patch.unprojected
    model.zero_grad()
    (model(x[:4]).sum() + model(x).sum()).backward()  # one wide forward in the same step: plain path
    assert patch.unprojected
    strat.after_backward(model)
    for n in ("0", "2"):
        g, M = strat.memory.modules[n].weight.grad, strat.memory.bases[n]
        assert (g @ M).norm() <= 1e-5 * g.norm()


@pytest.mark.parametrize("rank", [2, 9])  # thin "sub" factor and thin "keep" complement
def test_dense_small_layer_projector_gives_the_thin_factors_gradient(rank):
    torch.manual_seed(0)
    M, _ = torch.linalg.qr(torch.randn(12, rank))
    M2, _ = torch.linalg.qr(torch.randn(8, 3))
    grads = {}
    for dense_max in (0, 256):
        model = nn.Sequential(nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
        strat = GPM(model, GPMConfig(thresholds=(0.9,)))
        strat.memory.dense_max = dense_max
        strat.memory.bases = {"0": M, "2": M2}
        strat.memory._factors = {}
        assert strat.memory.factor("0")[0] == ("dense" if dense_max else ("sub" if rank == 2 else "keep"))
        model[0].weight.grad = torch.ones(8, 12) + torch.arange(12.0)
        model[2].weight.grad = torch.ones(3, 8) * torch.arange(8.0)
        strat.memory.project_()
        grads[dense_max] = [model[i].weight.grad.clone() for i in (0, 2)]
        assert (grads[dense_max][0] @ M).norm() < 1e-4
    for a, b in zip(grads[0], grads[256]):
        assert torch.allclose(a, b, atol=1e-5)


def test_input_cache_projects_small_layers_on_the_weight_gradient_not_in_backward():
    model = nn.Sequential(nn.Linear(300, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x = torch.randn(40, 5) @ torch.randn(5, 300)
    for cache, fast in ((False, {"0", "2"}), (True, {"0"})):  # 300 > 256: the cached (first) layer
        strat = GPM(model, GPMConfig(thresholds=(0.9,), input_cache=cache))
        strat.before_task(0, [(x, None)])
        strat.after_task(0, [(x, None)])
        strat.before_task(1, [(x, None)])
        assert strat.fast == fast
        assert [strat.memory.factor(n)[0] == "dense" for n in ("0", "2")] == [False, cache]
        strat.detach()
