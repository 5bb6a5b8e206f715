"""`kind-fmnist` end to end on the vendored Fashion-MNIST subset, at toy size (checks plumbing, not quality)."""

import dataclasses
import json

import torch

from transferlab.core.config import apply_overrides, config_from_dict
from transferlab.core.context import RunContext
from transferlab.core.engine import Engine
from transferlab.core.runner import run_experiment
from transferlab.kind.experiments import build_arm
from transferlab.nn.diffusion import Diffusion

TINY = {"pretrain_steps": 3, "transfer_steps": 3, "source_per_class": 40, "target_per_class": 10,
        "val_per_class": 10, "test_per_class": 20, "samples_per_class": 8, "judge_per_class": 20, "judge_epochs": 1,
        "ddim_steps": 2, "width": 16, "depth": 1, "heads": 2, "patch": 7, "n_learngene": 8, "n_tailor": 8,
        "paper_n_learngene": 12, "paper_n_tailor": 4,
        "batch_size": 16, "checkpoint_every": 2, "lrs": (1e-3, 3e-3)}


def test_kind_fmnist_runs_and_writes_table_grid_and_notes(tmp_path):
    arms = ("kind", "lora", "svdiff", "gated_lora_paper")
    out = run_experiment("kind-fmnist", "quick", seeds=1, overrides={**TINY, "arms": arms}, out=tmp_path,
                         engine=Engine("cpu", threads=1))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in rows) == ["gated_lora_paper", "kind", "lora", "svdiff"]
    for r in rows:
        m = r["metrics"]
        assert 0 <= m["class_acc"] <= 100 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert m["fmnist_fid"] >= 0 and m["fid_floor"] >= 0 and m["mflops"] > 0
        assert m["lr"] in (1e-3, 3e-3) and m["val_fid"] == m["val_fid"]  # chosen on validation, not NaN
    by_arm = {r["arm"]: r["metrics"] for r in rows}
    # LoRA's rank is matched to KIND's trainable parameters (within one rank step)
    assert abs(by_arm["lora"]["trainable_params"] - by_arm["kind"]["trainable_params"]) < 0.1 * \
        by_arm["kind"]["trainable_params"]
    assert by_arm["svdiff"]["trainable_params"] < by_arm["kind"]["trainable_params"]
    assert by_arm["gated_lora_paper"]["trainable_params"] < by_arm["lora"]["trainable_params"]
    assert all("fmnist_fid_g2" in m and "heldout_mse" in m for m in by_arm.values())  # both guidance tables
    assert all(r["choices"]["lr_tailor_init_scale"]["chosen"][0] == r["metrics"]["lr"] for r in rows)
    assert (out / "samples.png").exists() and (out / "table.md").exists()
    notes = (out / "section.md").read_text()  # the plot hook's notes land in the report section
    assert "NOT yet meaningful" in notes and "not** FID" in notes


def test_arms_and_transfer_settings_share_the_pretrained_model(tmp_path, monkeypatch):
    import transferlab.kind.experiments as E

    calls = []
    real_fit = E.fit
    monkeypatch.setattr(E, "fit", lambda *a, **k: (calls.append(k["steps"]), real_fit(*a, **k))[1])
    over = {**TINY, "arms": ("lora", "svdiff"), "lrs": (1e-3,), "pretrain_steps": 4}
    run_experiment("kind-fmnist", "quick", seeds=1, overrides=over, out=tmp_path, engine=Engine("cpu", threads=1))
    # one dense pre-training (4 steps) for both arms, then one transfer (3 steps) each
    assert calls == [4, 3, 3]
    # another transfer data size is another config, but not another pre-training
    run_experiment("kind-fmnist", "quick", seeds=1, overrides={**over, "target_per_class": 12, "arms": ("lora",)},
                   out=tmp_path, engine=Engine("cpu", threads=1))
    assert calls == [4, 3, 3, 3]
    assert [p.name for p in (tmp_path / "shared" / "kind-pretrained").glob("*/pretrained-*.pt")] == \
        ["pretrained-dense-seed0.pt"]
    # kind-fmnist-all transfers from the same pre-trained models
    run_experiment("kind-fmnist-all", "quick", seeds=1, overrides={**over, "arms": ("lora",)}, out=tmp_path,
                   engine=Engine("cpu", threads=1))
    assert calls == [4, 3, 3, 3, 3]


def test_an_arm_gets_the_same_metrics_whether_it_trains_the_shared_model_or_loads_it(tmp_path):
    import shutil

    over = {**TINY, "arms": ("kind",), "lrs": (1e-3,)}
    out = run_experiment("kind-fmnist", "quick", seeds=1, overrides=over, out=tmp_path,
                         engine=Engine("cpu", threads=1))
    built = json.loads((out / "results.jsonl").read_text())["metrics"]
    (out / "results.jsonl").unlink()
    shutil.rmtree(out / "runs")  # the shared pre-trained model stays: this time the arm loads it
    run_experiment("kind-fmnist", "quick", seeds=1, overrides=over, out=tmp_path, engine=Engine("cpu", threads=1))
    assert json.loads((out / "results.jsonl").read_text())["metrics"] == built


def test_the_method_config_is_nested_and_reaches_every_arm_as_is():
    from transferlab.core.registry import get_experiment
    from transferlab.kind.experiments import _kind_cfg, arm_config, pretrain_key

    exp = get_experiment("kind-fmnist")
    flat = exp.make_config("tiny", ["n_tailor=6", "assignment=random", "gate_seed=3"])
    dotted = exp.make_config("tiny", ["method.n_tailor=6", "method.assignment=random", "method.gate_seed=3"])
    assert flat == dotted and not hasattr(flat, "n_tailor")
    assert _kind_cfg(flat, gate=False) == dataclasses.replace(flat.method, gate=False)  # gate_seed too: not copied
    base, paper = arm_config(flat, "kind_paper")
    assert base == "kind" and (paper.method.n_learngene, paper.method.n_tailor) == (12, 4)
    assert paper.method.assignment == "random"
    # the dense model does not depend on the KIND decomposition; the KIND families do, on every field
    assert pretrain_key(flat, "dense") == pretrain_key(exp.make_config("tiny"), "dense")
    assert pretrain_key(flat, "kind") != pretrain_key(exp.make_config("tiny", ["gate_seed=3"]), "kind")


def test_arms_train_what_they_claim(tmp_path):
    from transferlab.kind.experiments import _load_data

    cfg = _tiny_cfg()
    engine = _ctx()
    data = _load_data(cfg, 0)
    trainable = {}
    for arm in ("scratch", "full_finetune", "svdiff", "kind", "kind_svd", "gated_lora"):
        model, _ = build_arm(cfg, arm, 0, engine, Diffusion(cfg.timesteps), data)
        trainable[arm] = {n for n, p in model.named_parameters() if p.requires_grad}
    all_params = {n for n, _ in build_arm(cfg, "full_finetune", 0, engine, Diffusion(), data)[0].named_parameters()}
    assert trainable["full_finetune"] == all_params
    assert all(n.endswith("delta") or "y_embed" in n or "final_layer" in n for n in trainable["svdiff"])
    assert not any(n.endswith(("U_g", "s_g", "V_g")) for n in trainable["kind"])
    assert any(n.endswith("U_t") for n in trainable["kind"])
    assert trainable["kind_svd"] == trainable["kind"]  # same transfer structure, other pre-training
    assert all(n.endswith((".A", ".B")) or "y_embed" in n or "final_layer" in n for n in trainable["gated_lora"])


def test_notes_separate_recognisable_from_close_to_real(tmp_path):
    from transferlab.kind.plots import plot_kind

    cfg = {"arms": ["kind", "lora", "scratch"], "target_classes": [6, 7, 8, 9], "width": 64, "depth": 4,
           "pretrain_steps": 6000, "transfer_steps": 1500}
    metrics = {"kind": (96.0, 10.0), "lora": (60.0, 61.0), "scratch": (30.0, 400.0)}  # (class_acc, fmnist_fid)
    rows = [{"arm": a, "seed": 0, "config_hash": "h", "profile": "cpu",
             "metrics": {"class_acc": acc, "fmnist_fid": fid, "fid_floor": 2.4}} for a, (acc, fid) in metrics.items()]
    text = plot_kind(rows, _plot_cfg(cfg), tmp_path).notes
    notes = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `")}
    assert "close to real images" in notes["kind"]
    assert "recognisable as their class, but far from real images" in notes["lora"]
    assert "NOT yet meaningful" in notes["scratch"]
    assert "6000 pre-training and 1500 transfer steps" in text


def _tiny_cfg(**over):
    from transferlab.kind.experiments import _QUICK, KindFmnistConfig

    return apply_overrides(KindFmnistConfig(), {**_QUICK, **TINY, **over})


def _ctx():
    """A run context outside the runner: shared artifacts are built in place, nothing is written."""
    return RunContext(Engine("cpu", threads=1), None, "test", "kind", 0, None)


def _plot_cfg(d: dict):
    from transferlab.kind.experiments import KindFmnistConfig

    return config_from_dict(KindFmnistConfig, d)


def test_every_arm_gets_its_learning_rate_per_parameter_group(tmp_path):
    """SVDiff's spectral shift gets svdiff_lr_mult, KIND's singular values sigma_lr_mult, the rest the base lr."""
    from transferlab.kind.experiments import ARMS, KIND_ARMS, _load_data, arm_config
    from transferlab.kind.model import kind_param_groups

    cfg = _tiny_cfg(svdiff_lr_mult=10.0, sigma_lr_mult=3.0)
    engine = _ctx()
    data = _load_data(cfg, 0)
    base = 1e-3
    for arm in ARMS:
        model, mult = build_arm(cfg, arm, 0, engine, Diffusion(cfg.timesteps), data)
        groups = kind_param_groups(model, base, mult)
        lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert len(lr_of) == sum(len(g["params"]) for g in groups) == len(trainable), arm
        for n, p in trainable:
            if arm == "svdiff" and n.endswith(".delta"):
                want = base * 10.0
            elif arm_config(cfg, arm)[0] in KIND_ARMS and n.endswith((".s_t", ".s_g")):
                want = base * 3.0
            else:
                want = base
            assert lr_of[id(p)] == want, (arm, n, lr_of[id(p)], want)
        if arm == "svdiff":
            assert any(n.endswith(".delta") for n, _ in trainable)
        if arm.endswith("_paper"):  # the paper-like share trains fewer parameters than today's share
            today, _ = build_arm(cfg, arm[:-6], 0, engine, Diffusion(cfg.timesteps), data)
            assert sum(p.numel() for _, p in trainable) < sum(p.numel() for p in today.parameters() if p.requires_grad)


def test_no_gate_pretraining_never_trains_learngenes_alone():
    """Without a gate the null (label-dropped) samples use every tailor too: no diversion at all."""
    from transferlab.kind import ClassGate

    gate = ClassGate(6, 8, gate=False)
    assert torch.equal(gate.mask(torch.arange(7)), torch.ones(7, 8))
    gated = ClassGate(6, 8)
    assert gated.mask(torch.tensor([6])).sum() == 0  # with the gate the null label is learngenes-only


def test_no_gate_transfer_keeps_the_largest_sigma_components_as_learngenes():
    from transferlab.kind import KindConfig, convert, transfer
    from transferlab.nn.dit import DiT

    torch.manual_seed(0)
    model = convert(DiT(image_size=8, patch=4, width=16, depth=1, heads=2, num_classes=3),
                    KindConfig(n_learngene=4, n_tailor=4, gate=False))
    layer = model.blocks[0].mlp.fc1
    with torch.no_grad():
        layer.s_g.copy_(torch.tensor([0.1, 5.0, 0.2, 0.3]))
        layer.s_t.copy_(torch.tensor([4.0, -6.0, 0.05, 3.0]))
    keep = torch.cat([layer.U_g, layer.U_t], 1)[:, [5, 1, 4, 7]].clone()
    transfer(model, 2, learngenes="top_sigma", gate=True)
    assert torch.equal(layer.s_g, torch.tensor([-6.0, 5.0, 4.0, 3.0]))
    assert torch.equal(layer.U_g, keep)


def test_notes_carry_a_guidance_2_table_with_paired_differences(tmp_path):
    from transferlab.kind.plots import plot_kind

    cfg = {"arms": ["kind", "lora"], "target_classes": [6, 7, 8, 9], "width": 64, "depth": 4,
           "pretrain_steps": 10, "transfer_steps": 10, "cfg_scales": [1.0, 2.0]}
    rows = [{"arm": a, "seed": s, "config_hash": "h", "profile": "cpu",
             "metrics": {"class_acc": 60.0, "fmnist_fid": 50.0, "fid_floor": 2.0,
                         "fmnist_fid_g2": base + s, "class_acc_g2": 90.0}}
            for a, base in (("kind", 10.0), ("lora", 14.0)) for s in range(3)]
    notes = plot_kind(rows, _plot_cfg(cfg), tmp_path).notes
    assert "**Guidance 2**" in notes
    lora = next(line for line in notes.splitlines() if line.startswith("| lora |"))
    assert lora.split(" | ")[1:4] == ["3", "15.00 ± 2.48", "90.00 ± 0.00"] and "4.00 ± 0.00" in lora


def test_contrast_table_gives_direction_by_metric_and_mde_for_nulls():
    from transferlab.kind.plots import contrast_table

    # kind's FMNIST-FID is 10 lower than lora's on every seed (better: lower is better), its class accuracy
    # the same up to noise (a null), and no gated_lora rows (its contrasts are left out)
    rows = [{"arm": a, "seed": s,
             "metrics": {"fmnist_fid": fid + s, "class_acc": 50.0 + (s % 2) * (1 if a == "kind" else -1)}}
            for a, fid in (("kind", 40.0), ("lora", 50.0), ("full_finetune", 35.0)) for s in range(4)]
    table = contrast_table(rows)
    lines = {line.split(" | ")[0][2:]: line for line in table if line.startswith("| kind")}
    assert set(lines) == {"kind − full_finetune", "kind − lora"}
    assert "-10.0 ± 0.0 better" in lines["kind − lora"] and "5.0 ± 0.0 worse" in lines["kind − full_finetune"]
    assert "n.d. (MDE" in lines["kind − lora"].split(" | ")[2]
    assert table[3].startswith("| a − b | fmnist_fid | class_acc |") and "heldout_mse" not in table[3]
