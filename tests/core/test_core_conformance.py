"""Every registered experiment keeps the runner's contract, on its `tiny` profile.

For each experiment: one arm and seed runs and writes finite metrics; a run killed right after its
first checkpoint (or finished stage) resumes to exactly the metrics of an uninterrupted run; a bad
`--set` is refused with a one-line error; and it declares the quick, cpu and full profiles.
"""

import json
import math

import pytest

from transferlab.core.context import RunContext
from transferlab.core.engine import Engine
from transferlab.core.errors import UserError
from transferlab.core.io import read_jsonl
from transferlab.core.registry import experiments
from transferlab.core.runner import run_experiment

NAMES = list(experiments())


class _Killed(BaseException):
    """Stands in for SIGKILL: raised right after state was written, so nothing after it runs."""


def _one_arm(name):
    exp = experiments()[name]
    arms = exp.make_config("tiny").arms
    return [exp.method_arm(arms) or arms[0]]


def _run(name, out, arms):
    run_experiment(name, "tiny", seeds=1, overrides={"arms": tuple(arms)}, out=out,
                   engine=Engine(device="cpu", threads=1), report=False)
    return {(r["arm"], r["seed"]): json.dumps(r["metrics"], sort_keys=True) for r in read_jsonl(out / name /
                                                                                             "results.jsonl")}


@pytest.mark.parametrize("name", NAMES)
def test_declares_the_three_profiles_and_a_tiny_one(name):
    assert {"quick", "cpu", "full", "tiny"} <= set(experiments()[name].profiles)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_run_resumes_after_a_kill_to_the_same_metrics(name, tmp_path, monkeypatch):
    if "tiny" not in experiments()[name].profiles:
        pytest.fail(f"{name} has no tiny profile")
    arms = _one_arm(name)
    ref = _run(name, tmp_path / "ref", arms)
    assert len(ref) == 1
    metrics = json.loads(next(iter(ref.values())))
    assert metrics and all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))

    saves = {"n": 0}
    real_save, real_stage = Engine.save_checkpoint, RunContext.stage

    def save_then_die(self, state):
        real_save(self, state)
        saves["n"] += 1
        raise _Killed

    def stage_then_die(self, stage_name, fn):
        real_stage(self, stage_name, fn)
        saves["n"] += 1
        raise _Killed

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    monkeypatch.setattr(RunContext, "stage", stage_then_die)
    try:
        _run(name, tmp_path / "killed", arms)
    except _Killed:
        pass
    monkeypatch.undo()
    resumed = _run(name, tmp_path / "killed", arms)
    assert resumed == ref, f"{name}: resumed metrics differ from an uninterrupted run ({saves['n']} saves)"


@pytest.mark.parametrize("name", NAMES)
def test_bad_set_is_refused_in_one_line(name):
    exp = experiments()[name]
    with pytest.raises(UserError, match="unknown config key 'no_such_option'") as e:
        exp.make_config("quick", ["no_such_option=1"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        exp.make_config("quick", ["seeds=many"])
    assert "\n" not in str(e.value)
