"""Strategies: regime logic, in-subspace step rules, TRGP scaling, EWC, end-to-end streams, experiments."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import UserError
from transferlab.cuber import CUBER, EWC, GPM, TRGP, CUBERConfig, EWCConfig, Finetune, GPMConfig, classify
from transferlab.cuber.trgp import REGIME_POSITIVE, REGIME_TRUST, REGIME_WEAK, in_subspace_step, task_basis


def basis(d, r, seed=0):
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))[0]


# ---- regimes (hand-built gradients) ------------------------------------------------------------
def test_regimes_from_hand_built_gradients():
    U = basis(10, 3)
    out = torch.randn(4, 10)
    inside = torch.randn(4, 3) @ U.T  # rows entirely in span(U)
    outside = out - out @ U @ U.T  # rows orthogonal to span(U)
    assert classify(outside, U, 0.2)[0] == REGIME_WEAK
    assert classify(outside, U, 0.2)[1] == pytest.approx(0.0, abs=1e-6)
    assert classify(inside, U, 0.2)[0] == REGIME_TRUST  # sufficient projection, no correlation test asked
    assert classify(inside, U, 0.2)[1] == pytest.approx(1.0, abs=1e-6)
    assert classify(inside, U, 0.2, g_old=2 * inside, eps_corr=0.5)[0] == REGIME_POSITIVE
    r = classify(inside, U, 0.2, g_old=-inside, eps_corr=0.5)
    assert r[0] == REGIME_TRUST and r[2] == pytest.approx(-1.0, abs=1e-6)
    # correlation is measured inside the subspace only: the outside part of g_old does not count
    r = classify(inside, U, 0.2, g_old=inside + 5 * outside, eps_corr=0.99)
    assert r[0] == REGIME_POSITIVE


def test_in_subspace_rules():
    U = basis(6, 2, 1)
    g = torch.randn(3, 6)
    d_free = in_subspace_step(g, U, [], "free", 0.5)
    assert torch.allclose(d_free, 0.5 * g @ U @ U.T, atol=1e-6)
    h = -(g @ U @ U.T)  # an old task whose loss would rise along this step
    assert in_subspace_step(g, U, [h], "gate").abs().sum() == 0
    d = in_subspace_step(g, U, [h], "agem")
    assert (d * h).sum() >= -1e-6  # no first-order increase of the old task's loss
    agree = g @ U @ U.T
    assert torch.allclose(in_subspace_step(g, U, [agree], "agem"), agree, atol=1e-6)


def test_task_basis_selects_old_vectors_by_energy():
    M = basis(8, 4, 2).double()
    A = (M[:, :1] * 3.0) @ torch.randn(1, 50, dtype=M.dtype)  # all energy along the first old vector
    B, _ = task_basis(M, A, 0.9)
    assert B.shape[1] == 1 and abs((B.T @ M[:, 0]).item()) == pytest.approx(1.0, abs=1e-6)


# ---- strategies ---------------------------------------------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(20, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def task_data(seed, n=120):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(5, 20, generator=g)
    x = torch.randn(n, 5, generator=g) @ P
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def fit(model, strat, tasks, steps=40):
    for t, (x, y) in enumerate(tasks):
        ld = [(x[i: i + 20], y[i: i + 20]) for i in range(0, len(x), 20)]
        strat.before_task(t, ld)
        strat.use_task(t)
        opt = torch.optim.SGD(list(model.parameters()) + strat.extra_parameters(), lr=0.05)
        for i in range(steps):
            xb, yb = ld[i % len(ld)]
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            strat.after_backward(model)
            opt.step()
        strat.after_task(t, ld)


def test_trgp_scaling_starts_at_identity_and_is_restored_per_task():
    torch.manual_seed(0)
    model = mlp()
    strat = TRGP(model, CUBERConfig(thresholds=(0.99,), eps_proj=0.0))
    tasks = [task_data(0), task_data(0)]  # identical inputs: full projection onto task 0's space
    fit(model, strat, tasks[:1])
    x = tasks[1][0]
    with torch.no_grad():
        plain = model(x).clone()
    strat.before_task(1, [tasks[1]])
    assert strat.extra_parameters(), "task 1 must get scaling matrices for the correlated task 0"
    with torch.no_grad():
        assert torch.allclose(model(x), plain, atol=1e-5)  # Q = I: the network is unchanged
    fit_rest = [(tasks[1][0], tasks[1][1])]
    opt = torch.optim.SGD(strat.extra_parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), tasks[1][1]).backward()
        strat.after_backward(model)
        opt.step()
    strat.after_task(1, fit_rest)
    with torch.no_grad():
        strat.use_task(1)
        y1 = model(x).clone()
        strat.use_task(0)
        y0 = model(x).clone()
    assert not torch.allclose(y1, y0)  # task 1 evaluates with its own Q
    assert torch.allclose(y0, plain, atol=1e-5)  # task 0 sees the unchanged weights (only Q was trained)


def test_cuber_regime3_moves_inside_old_subspace_and_gpm_does_not():
    x, y = task_data(3)
    moved = {}
    for cls in (GPM, CUBER):
        torch.manual_seed(0)
        model = mlp()
        cfg = GPMConfig(thresholds=(0.99,)) if cls is GPM else CUBERConfig(thresholds=(0.99,), eps_proj=0.0,
                                                                             eps_corr=-1.0, rule="free")
        strat = cls(model, cfg)
        fit(model, strat, [(x, y)], steps=5)  # under-trained task 0
        M = strat.memory.bases["0"].clone()
        w0 = model[0].weight.detach().clone()
        strat.before_task(1, [(x, y)])
        if cls is CUBER:
            assert all(r[1] == REGIME_POSITIVE for r in strat.regimes[1]["0"])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(20):  # the "new" task is the same data: positively correlated by construction
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strat.after_backward(model)
            opt.step()
        moved[cls.name] = ((model[0].weight.detach() - w0) @ M).norm().item()
    assert moved["gpm"] < 1e-5
    assert moved["cuber"] > 1e-3


def test_ewc_penalty_gradient_pulls_back():
    torch.manual_seed(0)
    model = mlp()
    strat = EWC(model, EWCConfig(lam=10.0, fisher_samples=30))
    x, y = task_data(4)
    fit(model, strat, [(x, y)], steps=10)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.zero_grad()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    strat.after_backward(model)
    fisher, theta = strat.anchors[0]
    expect = 10.0 * fisher["0.weight"] * (model[0].weight.detach() - theta["0.weight"])
    assert torch.allclose(model[0].weight.grad, expect) and expect.abs().sum() > 0


def test_cuber_config_validation():
    with pytest.raises(UserError, match="rule"):
        CUBERConfig(rule="sideways")
    with pytest.raises(UserError, match="eps_corr"):
        CUBERConfig(eps_corr=2.0)
    with pytest.raises(UserError, match="one value per layer|protected layers"):
        GPM(mlp(), GPMConfig(thresholds=(0.9, 0.9, 0.9)))


def test_gpm_beats_finetune_on_a_low_rank_stream():
    accs = {}
    tasks = [task_data(s) for s in (10, 11, 12)]
    for cls in (Finetune, GPM):
        torch.manual_seed(0)
        model = mlp()
        strat = cls(model) if cls is Finetune else cls(model, GPMConfig(thresholds=(0.97,)))
        fit(model, strat, tasks, steps=60)
        with torch.no_grad():
            accs[cls.name] = (model(tasks[0][0]).argmax(-1) == tasks[0][1]).float().mean().item()
    assert accs["gpm"] > accs["finetune"] + 0.05


# ---- experiments (vendored data subset) ---------------------------------------------------------
def test_rotated_experiment_runs_resumes_and_reports(tmp_path):
    from transferlab.core.runner import run_experiment

    out = run_experiment("cuber-rotated-fmnist", "tiny", seeds=1, out=tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == {"finetune", "gpm", "cuber"}
    for r in rows:
        R = r["metrics"]["R"]
        assert len(R) == 3 and all(len(row) == 3 for row in R)
        assert all(0 <= v <= 100 for row in R for v in row)
    assert (out / "accuracy_matrix.png").exists() and "BWT cuber − gpm" in (out / "section.md").read_text()


def test_killed_run_resumes_with_identical_metrics(tmp_path, monkeypatch):
    from transferlab.core.context import RunContext
    from transferlab.core.engine import Engine
    from transferlab.core.registry import get_experiment
    from transferlab.core.results import resolve_config
    from transferlab.cuber import train as train_mod

    exp = get_experiment("cuber-rotated-fmnist")
    over = {"n_tasks": 3, "n_train": 100, "n_test": 100, "epochs": 1}
    cfg = resolve_config(exp, "quick", over, 1)
    ref_engine = Engine(device="cpu", threads=1)
    ref_engine.run_dir = tmp_path / "ref"
    ref = exp.fn(cfg, "cuber", 0, RunContext(ref_engine, None, "h", "cuber", 0, ref_engine.run_dir))

    real, calls = train_mod.train_task, []

    def dies_on_task_2(model, strategy, task, task_id, **kw):
        calls.append(task_id)
        if task_id == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt  # killed mid-stream, after task 1's checkpoint
        return real(model, strategy, task, task_id, **kw)

    monkeypatch.setattr(train_mod, "train_task", dies_on_task_2)
    eng = Engine(device="cpu", threads=1)
    eng.run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        exp.fn(cfg, "cuber", 0, RunContext(eng, None, "h", "cuber", 0, eng.run_dir))
    resumed = exp.fn(cfg, "cuber", 0, RunContext(eng, None, "h", "cuber", 0, eng.run_dir))
    assert calls == [0, 1, 2, 2]  # tasks 0 and 1 were not retrained
    assert resumed["R"] == ref["R"] and resumed["bwt"] == ref["bwt"]


def test_split_experiment_multihead_cnn(tmp_path):
    from transferlab.core.runner import run_experiment

    out = run_experiment("cuber-split-fmnist", "tiny", seeds=1, overrides={"arms": ("gpm", "multitask")},
                         out=tmp_path)
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = {json.loads(line)["arm"]: json.loads(line)["metrics"] for line in lines}
    assert len(rows["gpm"]["R"]) == 5 and rows["gpm"]["basis_dims"]["body.0"] > 0
    assert len(rows["multitask"]["R"]) == 1


def test_cuber_trust_radius_bounds_the_in_subspace_move():
    x, y = task_data(5)
    torch.manual_seed(0)
    model = mlp()
    strat = CUBER(model, CUBERConfig(thresholds=(0.99,), eps_proj=0.0, eps_corr=-1.0, rule="free",
                                     trust_radius=0.05))
    fit(model, strat, [(x, y)], steps=5)
    strat.before_task(1, [(x, y)])
    B, _ = strat.positive["0"]
    w0 = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    moves = []
    for _ in range(2):
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strat.after_backward(model)
            opt.step()
        moves.append(((model[0].weight.detach() - w0) @ B).norm().item())
    radius = 0.05 * (w0 @ B).norm().item()
    # it does move inside the old subspace, fades out at the radius (up to one step of overshoot), then stalls
    assert 0.5 * radius < moves[0] <= 1.05 * radius
    assert moves[1] <= 1.05 * radius
