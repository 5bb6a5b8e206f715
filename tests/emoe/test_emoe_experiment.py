"""The emoe-wordnet experiment: arm settings (fast) and an end-to-end tiny run (slow, real MiniLM)."""

import json

import pytest
import torch

from transferlab.core.registry import get_experiment
from transferlab.emoe.experiments import ARMS, EMoEWordnetConfig, emoe_settings


def test_emoe_wordnet_arms_map_to_settings():
    cfg = EMoEWordnetConfig()
    assert emoe_settings(cfg, "dense") is None and emoe_settings(cfg, "lora") is None
    e = emoe_settings(cfg, "emoe")
    assert (e.num_experts, e.top_k, e.layers, e.split, e.select, e.gate) == (16, 4, (4,), "balanced-kmeans",
                                                                            "top-k", "avg-k")
    assert emoe_settings(cfg, "random-split").split == "random"
    # the random grouping is drawn per training seed, and the seed really changes the grouping
    from transferlab.emoe.cluster import split_permutation

    a, b = emoe_settings(cfg, "random-split", 0), emoe_settings(cfg, "random-split", 1)
    perm = [split_permutation(torch.zeros(64, 4), 16, c.split, c.seed, 1, 1) for c in (a, b)]
    assert a.seed != b.seed and not torch.equal(*perm)
    assert emoe_settings(cfg, "emoe", 0) == emoe_settings(cfg, "emoe", 1)  # clustering stays fixed
    assert emoe_settings(cfg, "bottom-k").select == "bottom-k"
    assert emoe_settings(cfg, "emoe-learn").gate == "learned"
    d = emoe_settings(cfg, "dropout-dense")
    assert d.top_k == d.num_experts and d.expert_dropout == 0.1  # dense function + the official dropout only
    assert e.expert_dropout == 0.0 and e.aux_loss_weight == 0.0  # EMoE arm carries no confounding extras
    exp = get_experiment("emoe-wordnet")
    assert exp.reference == "dense" and set(exp.make_config("full").arms) == set(ARMS)
    assert exp.make_config("full").seeds >= 5 and exp.make_config("full").n_train >= 20000
    assert exp.make_config("quick").arms == ("dense", "emoe")


def test_emoe_wordnet_lr_is_chosen_by_the_seed_mean_and_bootstrap_pairs_items():
    from transferlab.emoe.analysis import choose_lrs, paired_bootstrap

    def row(arm, seed, v0, v1):
        return {"arm": arm, "seed": seed, "metrics": {"lr0": 1e-4, "lr0_val_acc": v0, "lr1": 2e-4, "lr1_val_acc": v1}}

    # seed 0 prefers 2e-4 by a little, seed 1 prefers 1e-4 by a lot: the mean picks 1e-4 for both seeds
    rows = [row("emoe", 0, 50.0, 51.0), row("emoe", 1, 60.0, 50.0), row("dense", 0, 40.0, 40.0)]
    assert choose_lrs(rows) == {"emoe": 1e-4, "dense": 1e-4}
    a = {s: torch.tensor([1, 1, 0, 1]) for s in range(3)}
    b = {s: torch.tensor([1, 0, 0, 1]) for s in range(3)}
    mean, lo, hi = paired_bootstrap(a, b, reps=200)
    assert mean == pytest.approx(25.0) and lo <= mean <= hi and lo >= 0


def test_emoe_curves_table_marks_the_epoch_validation_picks(tmp_path):
    from transferlab.emoe.analysis import curves_markdown, write_details

    def h(v, i, o):
        return {"val_acc": v, "id_acc": i, "ood_acc": o}

    runs = {1e-4: {"best_epoch": 2, "best": {}, "history": [h(10, 11, 12), h(30, 31, 32), h(20, 21, 22)]}}
    write_details(tmp_path, "cfg", "dense", 0, runs)
    # a seed that evaluated validation only has no test curve: it is left out
    write_details(tmp_path, "cfg", "emoe", 0, {1e-4: {"best_epoch": 1, "best": {}, "history": [{"val_acc": 5.0}] * 3}})
    md = curves_markdown(tmp_path, "cfg", ("dense", "emoe"))
    assert "| `dense` | 0.0001 | 10.0 / 11.0 / 12.0 | **30.0 / 31.0 / 32.0** | 20.0 / 21.0 / 22.0 |" in md
    assert "`emoe`" not in md and "epoch 3" in md
    assert curves_markdown(tmp_path, "other", ("dense",)) == ""


def test_emoe_length_buckets_keep_every_example_once_and_cut_padding():
    from transferlab.emoe.experiments import epoch_batches

    lengths = torch.randint(5, 33, (640,), generator=torch.Generator().manual_seed(0)).tolist()
    b = epoch_batches(lengths, 32, 3, 8)
    assert sorted(torch.cat(b).tolist()) == list(range(640))
    assert [t.tolist() for t in b] == [t.tolist() for t in epoch_batches(lengths, 32, 3, 8)]  # deterministic
    pad = sum(max(lengths[i] for i in t.tolist()) for t in b)
    plain = sum(max(lengths[i] for i in t.tolist()) for t in epoch_batches(lengths, 32, 3, 0))
    assert pad < 0.8 * plain


def test_emoe_official_arm_carries_the_published_recipe():
    cfg = EMoEWordnetConfig()
    o = emoe_settings(cfg, "emoe-official")
    assert (o.gate_noise, o.capacity_factor, o.aux_loss_weight, o.expert_dropout, o.expert_dropout_position) == (
        1.0, 1.5, 0.01, 0.1, "pre")
    cpu = get_experiment("emoe-wordnet").make_config("cpu")
    assert set(cpu.arms) == {"dense", "emoe", "emoe-official"} and cpu.seeds >= 8
    curves = get_experiment("emoe-wordnet").make_config("cpu-curves")
    assert curves.epochs == 5 and curves.curve_seeds == 1 and len(curves.lrs) >= 2
    # stage 2's lr is one that stage 1's grid tried (chosen there on validation)
    assert cpu.n_test >= 3000 and cpu.weight_decay == 0.0 and cpu.warmup == 0.0 and set(cpu.lrs) <= set(curves.lrs)


@pytest.mark.slow
def test_emoe_wordnet_tiny_run(tmp_path):
    from transferlab.core.runner import run_experiment

    over = {"arms": ("dense", "emoe", "emoe-official", "emoe-reverted", "lora-emoe")}
    out = run_experiment("emoe-wordnet", "tiny", seeds=1, overrides=over, out=tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {r["arm"]: r["metrics"] for r in rows}
    assert set(by) == set(over["arms"])
    for m in by.values():
        assert 0 <= m["id_acc"] <= 100 and 0 <= m["ood_f1"] <= 100 and m["best_epoch"] in (1, 2)
        assert m["lr"] in (m["lr0"], m.get("lr1"))
    assert by["emoe-reverted"]["lr"] == by["emoe"]["lr"]  # the same trained run, served dense
    h = rows[0]["config_hash"]
    assert (out / "shared" / h / "emoe-runs-with-reverted-seed0.pt").exists()  # trained once for both arms
    for r in rows:  # the per-seed lr choice is recorded with its validation scores
        assert r["choices"]["lr"]["chosen"] == r["metrics"]["lr"] and len(r["choices"]["lr"]["scores"]) >= 1
    assert by["lora-emoe"]["lr"] == 1e-3
    assert (out / "table.md").exists() and "seed mean" in (out / "section.md").read_text()
    assert (out / "emoe_wordnet_curves.png").exists() and (out / "emoe_wordnet_usage.png").exists()
    dense = json.loads((out / "details" / rows[0]["config_hash"] / "dense-seed0.json").read_text())[format(1e-4, "g")]
    assert "ood_acc" in dense["history"][dense["best_epoch"] - 1]  # the test splits at the best epoch
    det = json.loads((out / "details" / h / "emoe-official-seed0.json").read_text())
    one = det[format(1e-4, "g")]
    assert len(one["history"]) == 2 and len(one["pred"]["ood"]) == len(one["label"]["ood"]) >= 30
    usage = torch.tensor(one["usage"]["id"]["4"])  # (39 classes, 16 experts) routing counts on the ID test
    assert usage.shape == (39, 16) and usage.sum() > 0


@pytest.mark.slow
def test_emoe_wordnet_resume_after_kill_gives_same_weights(tmp_path):
    """A run killed after epoch 1 resumes from its checkpoint and ends with bitwise the same weights."""
    import torch

    from transferlab.core.engine import Engine
    from transferlab.emoe.data import supersense_data
    from transferlab.emoe.experiments import train_one

    cfg = EMoEWordnetConfig(n_train=32, n_val=10, n_test=10, max_len=12, batch_size=16, epochs=2)
    data = supersense_data(32, 10, 10, 0)
    engine = Engine(device="cpu")

    def train(folder, resume=None):
        engine.run_dir = tmp_path / folder
        if resume is None:
            engine.seed(0)
        return train_one(cfg, "emoe", 0, 1e-4, data, engine, "t", runs={}, resume=resume)[0].state_dict()

    ref = train("a")

    class Killed(Exception):
        pass

    real_save = engine.save_checkpoint

    def save_then_die(state):
        real_save(state)
        raise Killed

    engine.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        train("b")
    engine.save_checkpoint = real_save
    engine.run_dir = tmp_path / "b"
    ckpt = engine.load_checkpoint()
    assert ckpt["current"]["epoch"] == 1
    engine.seed(123)  # a fresh process would start from another RNG state; resume must restore it
    resumed = train("b", resume=ckpt["current"])
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)
