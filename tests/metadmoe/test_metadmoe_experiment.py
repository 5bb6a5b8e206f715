"""Domain construction and a tiny end-to-end run of the registered experiment on the vendored data."""

import dataclasses
import json

import pytest
import torch

from transferlab.core.config import apply_overrides
from transferlab.core.errors import UserError
from transferlab.data import load_fashion_mnist
from transferlab.metadmoe.domains import corrupt, make_domains, rotate, shard_indices
from transferlab.metadmoe.experiments import ARMS


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clean", "noise", "blur", "contrast", "inversion", "tint"])
def test_corruptions_are_three_channel_in_range_and_label_free(kind):
    x = torch.rand(8, 1, 28, 28)
    a = corrupt(x, kind, torch.Generator().manual_seed(0))
    b = corrupt(x, kind, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 28, 28) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)  # severity depends only on the generator, never on labels
    if kind != "clean":
        assert not torch.allclose(a, x.expand(-1, 3, -1, -1))


def test_domains_are_disjoint_shards():
    shards = shard_indices(3, 6, 1000, 120, 500, 64)
    train = torch.cat([s[0] for s in shards])
    test = torch.cat([s[1] for s in shards])
    assert len(train.unique()) == 720 and len(test.unique()) == 384  # no image in two domains
    names, doms = make_domains("rotated", 0, 50, 10, 20)
    assert len(names) == len(doms) == 6
    assert [len(d[0][0]) for d in doms] == [50] * 6 and [len(d[1][0]) for d in doms] == [10] * 6
    torch.testing.assert_close(doms[0][0][0], make_domains("rotated", 0, 50, 10, 20)[1][0][0][0])  # seeded
    with pytest.raises(UserError, match="Lower n_train"):
        make_domains("rotated", 0, 10_000, 10, 20)


def test_validation_domains_are_disjoint_from_every_other_shard():
    names, doms, val = make_domains("rotated", 0, 50, 10, 20, n_valdom=30)
    assert [v[0] for v in val] == [7.5, 37.5, 67.5] and not set(v[0] for v in val) & set(names)
    raw, _ = load_fashion_mnist("train")
    perm = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))  # the shards' permutation
    used = perm[: 6 * 60]  # the six train+val shards
    val_idx = perm[6 * 60: 6 * 60 + 3 * 30]
    assert not set(used.tolist()) & set(val_idx.tolist())
    torch.testing.assert_close(val[0][1][0], rotate(raw[val_idx[:30]].float().div(255).unsqueeze(1), 7.5))
    _, mixed, mval = make_domains("mixed", 0, 20, 4, 8, n_valdom=6)
    assert all(d[0][0].shape[1:] == (3, 28, 28) for d in mixed) and [v[0] for v in mval][0] == "rot30"


def test_quick_experiment_runs_end_to_end_and_resumes(tmp_path):
    import transferlab.core.registry as registry
    import transferlab.metadmoe.experiments  # noqa: F401  (registers the experiments)
    from transferlab.core.engine import Engine
    from transferlab.core.runner import run_experiment

    registry._loaded = True  # only this package's experiments are needed here
    over = {"held_out": (5,), "n_train": 140, "n_val": 64, "n_valdom": 64, "n_test": 128, "student_epochs": 3,
            "patience": 1, "expert_epochs": 2, "aggregator_epochs": 1, "meta_epochs": 1, "episodes_per_epoch": 4,
            "log_every": 2, "inner_lrs": (1e-3, 1e-2), "tent_lrs": (1e-3, 1e-2)}
    engine = Engine(device="cpu", threads=1)
    out = run_experiment("metadmoe-rotated-fmnist", "quick", overrides=over, out=tmp_path, engine=engine)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == set(ARMS)
    for r in rows:
        assert 0 <= r["metrics"]["acc_avg"] <= 100 and r["metrics"]["acc_avg"] == r["metrics"]["acc_d5"]
    by_arm = {r["arm"]: r["metrics"] for r in rows}
    assert by_arm["tent"]["lr_d5"] in (1e-3, 1e-2) and "val_acc_d5_lr0.01" in by_arm["metadmoe"]
    choice = {r["arm"]: r.get("choices", {}) for r in rows}["metadmoe"]["inner_lr_d5"]
    assert choice["candidates"] == [1e-3, 1e-2] and choice["chosen"] == by_arm["metadmoe"]["lr_d5"]
    assert "acc_noadapt_d5" in by_arm["metadmoe"] and "acc_noadapt_d5" not in by_arm["adapt_no_meta"]
    erm = by_arm["erm"]
    mat = erm["expert_matrix_d5"]
    assert len(mat) == 5 and all(len(row) == 6 for row in mat) and erm["expert_domains_d5"] == [0, 1, 2, 3, 4]
    assert {"ensemble_acc_d5", "teacher_acc_d5", "teacher_shead_acc_d5", "mse_teacher_d5"} <= set(erm)
    assert 1 <= erm["student_epochs_d5"] <= 3  # early stopping chose an epoch
    meta = by_arm["metadmoe"]
    assert [c[0] for c in meta["curve_d5"]] == [2, 4] and meta["mse_before_d5"] >= 0
    assert "oracle_expert_acc_d5" in by_arm["oracle"]
    notes = (out / "section.md").read_text()  # the plot hook's notes land in the report section
    assert "Protocol and caveats" in notes and "Go/no-go" in notes
    assert (out / "table.md").exists() and (out / "expert_matrix.png").exists() and (out / "meta_curve.png").exists()
    run_experiment("metadmoe-rotated-fmnist", "quick", overrides=over, out=tmp_path, engine=engine)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)  # nothing re-run


def test_erm_extra_takes_one_labeled_step_per_meta_episode(monkeypatch):
    from transferlab.metadmoe import experiments as ex

    cfg = apply_overrides(ex.MetaDMoEExperimentConfig(), {"n_train": 140, "n_val": 64, "n_valdom": 64, "n_test": 128,
                                                          "meta_epochs": 2, "episodes_per_epoch": 3})
    m = ex._new_model(cfg, ex._method_config(cfg, "metadmoe", 1e-3))
    base = {"state": {k: v.clone() for k, v in m.state_dict().items()}}
    _, doms = make_domains("rotated", 0, 140, 64, 128)
    steps = []
    real = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (steps.append(1), real(self, *a, **k))[1])
    s = ex._erm_extra(cfg, 0, 5, [d[0] for d in doms[:5]], base)
    assert len(steps) == 6  # meta_epochs x episodes_per_epoch
    assert any(not torch.equal(p, base["state"]["student." + n]) for n, p in s.state_dict().items())


def test_arm_bn_trains_with_batch_statistics_and_erm_extra_in_the_meta_training_mode():
    from transferlab.metadmoe import experiments as ex

    cfg = apply_overrides(ex.MetaDMoEExperimentConfig(), {"n_train": 140, "n_val": 64, "n_valdom": 64, "n_test": 128,
                                                          "meta_epochs": 1, "episodes_per_epoch": 3})
    m = ex._new_model(cfg, ex._method_config(cfg, "metadmoe", 1e-3))
    base = {"state": {k: v.clone() for k, v in m.state_dict().items()}}
    _, doms = make_domains("rotated", 0, 140, 64, 128)
    src = [d[0] for d in doms[:5]]
    stats = "body.1.running_mean"
    extra = ex._erm_extra(cfg, 0, 5, src, base)  # eval mode, as meta-training: BN statistics frozen
    assert torch.equal(extra.state_dict()[stats], base["state"]["student." + stats])
    arm_bn = ex._erm_extra(cfg, 0, 5, src, base, batch_stats=True)  # train mode on single-domain batches
    assert not torch.equal(arm_bn.state_dict()[stats], base["state"]["student." + stats])


def test_the_method_config_is_nested_and_passed_to_every_arm_as_is():
    from transferlab.core.registry import get_experiment
    from transferlab.metadmoe import experiments as ex

    exp = get_experiment("metadmoe-rotated-fmnist")
    flat = exp.make_config("tiny", ["patience=2", "student_lr=0.01"])
    dotted = exp.make_config("tiny", ["method.patience=2", "method.student_lr=0.01"])
    assert flat == dotted and flat.method.patience == 2 and flat.method.student_lr == 0.01
    assert not hasattr(flat, "patience")  # one home per field: no flat copy beside the nested one
    mc = ex._method_config(flat, "no_mask", 3e-3)
    assert mc == dataclasses.replace(flat.method, inner_lr=3e-3, mask_own_expert=False)
    # a field the experiment never copied (batch size of stages 1-3) reaches the model, and re-keys the
    # shared stages 1-3 (they read it)
    assert ex._method_config(exp.make_config("tiny", ["batch_size=32"]), "metadmoe", 1e-3).batch_size == 32
    assert "batch_size" in ex.BASE_METHOD_FIELDS
    with pytest.raises(UserError, match="n_train must be at least support_size"):
        exp.make_config("tiny", ["support_size=200"])
