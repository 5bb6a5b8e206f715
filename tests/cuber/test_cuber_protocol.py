"""Protocol options that follow the official GPM code, validation choices, and the new streams."""

import json

import pytest
import torch
from torch import nn

from transferlab.core.context import RunContext
from transferlab.core.engine import Engine
from transferlab.core.errors import UserError
from transferlab.cuber import GPM, GPMConfig
from transferlab.cuber import experiments as ex
from transferlab.cuber import train as train_mod
from transferlab.cuber.streams import FMNIST_MEAN, FMNIST_STD, chunks_stream, permuted_stream


def test_permuted_inputs_are_normalised_before_permuting():
    raw = permuted_stream(2, n_train=200, n_test=20, normalize=False)
    norm = permuted_stream(2, n_train=200, n_test=20, normalize=True)
    xr, _ = next(iter(raw[1].loader(200, None)))
    xn, _ = next(iter(norm[1].loader(200, None)))
    assert 0.0 <= xr.min() and xr.max() <= 1.0
    assert torch.allclose(xn, (xr - FMNIST_MEAN) / FMNIST_STD, atol=1e-6)
    assert abs(xn.mean().item()) < 0.15  # the statistics are Fashion-MNIST's own


def _bn_net():
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU(),
                         nn.Linear(5, 3, bias=False))


def test_representations_use_one_forward_batch_of_rep_batch():
    torch.manual_seed(0)
    x = torch.randn(125, 6) * torch.linspace(0.5, 3, 125)[:, None]
    loader = [(x[i: i + 25], None) for i in range(0, 125, 25)]
    reps = {}
    for rb in (125, None):
        torch.manual_seed(0)
        strat = GPM(_bn_net(), GPMConfig(thresholds=(0.9,), n_samples=(125,), rep_batch=rb))
        reps[rb] = strat.representations(0, loader)["3"]
    with torch.no_grad():
        net = strat.model
        h = torch.relu(net[1](net[0](x)))  # one batch of 125: BN statistics over all of them
    assert torch.allclose(reps[125], h.T, atol=1e-5)
    assert not torch.allclose(reps[None], h.T, atol=1e-3)  # five batches of 25: different BN statistics
    with pytest.raises(UserError, match="rep_batch"):
        GPMConfig(rep_batch=0)


def test_early_stopping_restores_the_best_validation_weights(monkeypatch):
    tasks = chunks_stream(2, n_train=60, n_test=20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 10, bias=False))
    strat = GPM(model, GPMConfig(thresholds=(0.9,), n_samples=(30,)))
    losses = iter([1.0, 0.5, 0.9, 0.8, 0.7, 0.6])  # best after epoch 2
    snaps = []

    def fake_val(m, s, task, t, batch_size=1000):
        snaps.append(m[0].weight.detach().clone())
        return next(losses)

    monkeypatch.setattr(train_mod, "val_loss", fake_val)
    ran = train_mod.train_task(model, strat, tasks[0], 0, lr=0.1, epochs=6, batch_size=16, seed=0, patience=2,
                               lr_factor=2.0, lr_min=0.03)
    # epochs 3 and 4 do not improve: lr 0.1 -> 0.05; epochs 5, 6 do not: 0.025 < lr_min -> stop after 6
    assert ran == 6
    assert torch.equal(model[0].weight, snaps[1])


def test_ewc_lambda_is_chosen_on_validation_seeds_only():
    cfg = ex.ChunksConfig(ewc_grid=(1.0, 10.0, 100.0), val_seeds=2)
    seen = []

    def fit_one(c, lam, s):
        seen.append((c.eval_split, s))
        return {"acc": {1.0: 50.0, 10.0: 70.0, 100.0: 60.0}[lam] + s % 2}

    ctx = RunContext(Engine(device="cpu", threads=1), None, "h", "ewc", 0, None)
    lam, scores = ex.choose_on_val_seeds(cfg, "ewc_lam", list(cfg.ewc_grid), fit_one, ctx)
    assert lam == 10.0 and len(scores) == 3
    assert ctx.choices["ewc_lam"] == {"candidates": [1.0, 10.0, 100.0], "scores": scores, "chosen": 10.0}
    assert all(split == "val" and s >= ex.VAL_SEED0 for split, s in seen)
    assert {s for _, s in seen} == {ex.VAL_SEED0, ex.VAL_SEED0 + 1}


def test_arms_name_their_rule_and_unknown_arms_fail():
    assert ex.arm_rule("cuber") == "" and ex.arm_rule("cuber_backward") == "backward"
    assert ex.arm_rule("gpm_long") is None
    with pytest.raises(UserError, match="unknown arm"):
        ex.ChunksConfig(arms=("gpm", "cuber_sideways"))
    assert "rule=gate" in ex.rule_label("cuber_gate", ex.StreamConfig(method=ex.CUBERConfig(rule="free")))
    assert "rule=free" in ex.rule_label("cuber", ex.StreamConfig(method=ex.CUBERConfig(rule="free")))
    assert "from free/gate" in ex.rule_label("cuber_val", ex.StreamConfig(val_rules=("free", "gate")))


@pytest.mark.parametrize("name,arms", [
    ("cuber-chunks-fmnist", ("finetune", "ewc", "gpm", "cuber_backward")),
    ("cuber-pairs-fmnist", ("gpm", "trgp", "cuber")),
])
def test_new_streams_run_and_report_the_rule(tmp_path, name, arms):
    from transferlab.core.runner import run_experiment

    out = run_experiment(name, "tiny", seeds=1, overrides={"arms": arms}, out=tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == set(arms)
    notes = (out / "section.md").read_text()
    assert "rule=" in notes
    if "ewc" in arms:
        assert "EWC lambda chosen" in notes
        ewc = next(r for r in rows if r["arm"] == "ewc")
        assert ewc["choices"]["ewc_lam"]["chosen"] == ewc["metrics"]["ewc_lam"]


def test_notes_give_a_verdict_per_comparison():
    rows = [{"arm": a, "seed": s, "metrics": {"bwt": v + s * 0.1, "acc": 50.0 + s}}
            for s in range(4) for a, v in (("gpm", 0.0), ("trgp", 1.0), ("cuber", 2.0))]
    cfg = ex.StreamConfig(arms=("gpm", "trgp", "cuber"), method=ex.CUBERConfig(
        rule="free", corr_space="subspace", eps_corr=0.0, trust_radius=0.0, step_scale=1.0))
    notes = ex.checks_markdown(rows, cfg)
    assert "BWT cuber − gpm: 2.00 ± 0.00 over 4 seeds (CI above 0)" in notes
    assert "BWT cuber − trgp: 1.00 ± 0.00 over 4 seeds (CI above 0)" in notes
    assert "`cuber`: rule=free" in notes
