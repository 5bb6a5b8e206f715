"""The run context: shared artifacts, resumable stages and validation choices."""

import json
import multiprocessing as mp

import pytest
import torch

from transferlab.core.context import RunContext
from transferlab.core.engine import Engine
from transferlab.core.errors import UserError


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", threads=1)


def _ctx(engine, tmp_path, arm="a", seed=0, h="cfg1"):
    return RunContext(engine, tmp_path / "exp", h, arm, seed, tmp_path / "exp" / "runs" / h / f"{arm}-seed{seed}")


def test_shared_is_built_once_per_config_and_seed(engine, tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(3.0)}

    a = _ctx(engine, tmp_path, "a", 0).shared("teacher", build)
    b = _ctx(engine, tmp_path, "b", 0).shared("teacher", build)  # another arm, same seed: reused
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    _ctx(engine, tmp_path, "a", 1).shared("teacher", build)  # another seed: built again
    _ctx(engine, tmp_path, "a", 1, h="cfg2").shared("teacher", build)  # another config: built again
    _ctx(engine, tmp_path, "a", 5).shared("vocab", build, per_seed=False)
    _ctx(engine, tmp_path, "a", 6).shared("vocab", build, per_seed=False)  # per config only
    assert len(calls) == 4


def test_shared_key_lets_configs_that_agree_on_it_share(engine, tmp_path):
    calls = []
    build = lambda: calls.append(1) or torch.ones(1)  # noqa: E731
    _ctx(engine, tmp_path, h="x").shared("pre", build, key={"steps": 10})
    _ctx(engine, tmp_path, h="y").shared("pre", build, key={"steps": 10})
    _ctx(engine, tmp_path, h="y").shared("pre", build, key={"steps": 20})
    assert len(calls) == 2


def test_a_failed_build_leaves_nothing_behind(engine, tmp_path):
    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _ctx(engine, tmp_path).shared("teacher", boom)
    assert not list((tmp_path / "exp" / "shared").rglob("*.pt"))
    assert float(_ctx(engine, tmp_path).shared("teacher", lambda: torch.tensor(2.0))) == 2.0


def _build_in_worker(args):
    path, log = args
    eng = Engine(device="cpu", threads=1)

    def build():
        with open(log, "a") as f:
            f.write("built\n")
        import time

        time.sleep(0.3)
        return torch.tensor(7.0)

    from pathlib import Path

    return float(RunContext(eng, Path(path), "h", "a", 0, None).shared("x", build))


def test_shared_is_built_by_one_of_several_processes(tmp_path):
    log = tmp_path / "log.txt"
    with mp.get_context("spawn").Pool(3) as pool:
        values = pool.map(_build_in_worker, [(str(tmp_path / "exp"), str(log))] * 3)
    assert values == [7.0, 7.0, 7.0]
    assert log.read_text().count("built") == 1


def test_stage_resumes_with_the_same_value_and_random_state(engine, tmp_path):
    torch.manual_seed(0)
    ctx = _ctx(engine, tmp_path)
    first = ctx.stage("pretrain", lambda: torch.randn(3))
    after = torch.randn(2)  # what the run draws next

    torch.manual_seed(123)  # a restarted process starts from another state...
    calls = []
    again = _ctx(engine, tmp_path).stage("pretrain", lambda: calls.append(1) or torch.randn(3))
    assert not calls and torch.equal(first, again)
    assert torch.equal(torch.randn(2), after)  # ...and continues exactly where the first run was


def test_finish_removes_stages(engine, tmp_path):
    ctx = _ctx(engine, tmp_path)
    ctx.stage("s", lambda: 1)
    assert (ctx.run_dir / "stages" / "s.pt").exists()
    ctx.finish()
    assert not (ctx.run_dir / "stages").exists()


def test_choose_on_validation_keeps_the_best_and_records_all(engine, tmp_path):
    ctx = _ctx(engine, tmp_path)
    val = {1e-3: 0.5, 1e-2: 0.8, 1e-1: 0.8}
    chosen, fitted = ctx.choose_on_validation("lr", [1e-3, 1e-2, 1e-1], fit=lambda lr: ("model", lr),
                                              score=lambda m: val[m[1]])
    assert chosen == 1e-2 and fitted == ("model", 1e-2)  # ties keep the earlier candidate
    rec = ctx.choices["lr"]
    assert rec["scores"] == [0.5, 0.8, 0.8] and rec["chosen"] == 1e-2
    json.dumps(ctx.choices)
    low, _ = ctx.choose_on_validation("lam", [1, 2], fit=lambda x: x, score=lambda x: x, higher_is_better=False)
    assert low == 1
    with pytest.raises(UserError, match="no candidates"):
        ctx.choose_on_validation("none", [], fit=lambda x: x, score=lambda x: 0.0)


def test_context_forwards_the_engine(engine, tmp_path):
    ctx = _ctx(engine, tmp_path)
    assert ctx.device == engine.device and ctx.num_processes == 1 and ctx.prepare is not None


def test_scope_shares_across_experiments_and_needs_a_key(engine, tmp_path):
    calls = []
    build = lambda: calls.append(1) or torch.ones(1)  # noqa: E731
    a = RunContext(engine, tmp_path / "exp-a", "h1", "x", 0, None)
    b = RunContext(engine, tmp_path / "exp-b", "h2", "y", 0, None)
    a.shared("pre", build, key={"steps": 3}, scope="family")
    b.shared("pre", build, key={"steps": 3}, scope="family")
    assert len(calls) == 1 and (tmp_path / "shared" / "family").is_dir()
    with pytest.raises(UserError, match="needs a key"):
        a.shared("pre", build, scope="family")
