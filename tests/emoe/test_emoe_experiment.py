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


@pytest.mark.slow
def test_emoe_wordnet_tiny_run(tmp_path):
    from transferlab.core.runner import run_experiment

    over = {"arms": ("dense", "emoe", "emoe-reverted", "lora-emoe"), "n_train": 64, "n_val": 20, "n_test": 30,
            "lrs": (1e-4, 3e-4), "lora_lrs": (1e-3,), "max_len": 16, "batch_size": 16}
    out = run_experiment("emoe-wordnet", "quick", seeds=1, overrides=over, out=tmp_path)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {r["arm"]: r["metrics"] for r in rows}
    assert set(by) == set(over["arms"])
    for m in by.values():
        assert 0 <= m["id_acc"] <= 100 and 0 <= m["ood_f1"] <= 100
    assert by["emoe-reverted"]["lr"] == by["emoe"]["lr"]  # the same trained run, served dense
    assert by["lora-emoe"]["lr"] == 1e-3
    assert (out / "table.md").exists() and (out / "notes.md").exists()


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
        return train_one(cfg, "emoe", 0, 1e-4, data, engine, "t", runs={}, resume=resume).state_dict()

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
