"""Runner, resume after SIGKILL, report files, and CLI errors (one line, exit 2, no traceback)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferlab.cli import main
from transferlab.core.io import read_jsonl

TINY = ["source_per_class=60", "pretrain_epochs=3", "shots=3", "val_per_class=10", "test_per_class=20",
        "target_steps=5", "lrs=0.001", "width=8"]


def _cli(*args, env_extra=None, cwd=None):
    env = {**os.environ, "TRANSFERLAB_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "transferlab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _metrics(path: Path):
    return sorted((r["arm"], r["seed"], json.dumps(r["metrics"], sort_keys=True)) for r in read_jsonl(path))


def test_run_writes_results_table_and_report(tmp_path):
    args = [f"--set={s}" for s in TINY]
    assert main(["run", "fmnist-transfer", "--seeds", "2", "--out", str(tmp_path), *args]) == 0
    d = tmp_path / "fmnist-transfer"
    rows = read_jsonl(d / "results.jsonl")
    assert len(rows) == 6 and {r["arm"] for r in rows} == {"finetune", "linear_probe", "scratch"}
    assert all(0 <= r["metrics"]["test_acc"] <= 100 for r in rows)
    table = (d / "table.md").read_text()
    assert "finetune (ref)" in table and "±" in table and "Δtest_acc vs finetune" in table
    assert (d / "table.csv").read_text().startswith("arm,n,test_acc_mean")
    assert (d / "metric.png").stat().st_size > 1000
    html = (tmp_path / "report.html").read_text()
    assert "fmnist-transfer" in html and "data:image/png;base64," in html
    # a rerun with the same config does nothing new
    assert main(["run", "fmnist-transfer", "--seeds", "2", "--out", str(tmp_path), *args]) == 0
    assert len(read_jsonl(d / "results.jsonl")) == 6
    # one arm alone reuses the finished runs, and its table lists only that arm
    assert main(["run", "fmnist-transfer", "--seeds", "2", "--out", str(tmp_path), "--set=arms=scratch", *args]) == 0
    assert len(read_jsonl(d / "results.jsonl")) == 6
    table = (d / "table.md").read_text()
    assert "scratch" in table and "linear_probe" not in table


def test_jobs_share_the_runs_and_match_a_sequential_run(tmp_path):
    args = [f"--set={s}" for s in TINY]
    seq, par = tmp_path / "seq", tmp_path / "par"
    # both with one torch thread per process: a different thread count may change float sums
    assert _cli("run", "fmnist-transfer", "--seeds", "2", "--out", str(seq), "--no-report", *args).returncode == 0
    r = _cli("run", "fmnist-transfer", "--seeds", "2", "--jobs", "2", "--out", str(par), "--no-report", *args)
    assert r.returncode == 0, r.stderr
    d = par / "fmnist-transfer"
    assert _metrics(d / "results.jsonl") == _metrics(seq / "fmnist-transfer" / "results.jsonl")  # each run once
    assert (d / "job-0.log").exists() and (d / "job-1.log").exists() and (d / "table.md").exists()
    assert not list(d.glob(".claims-*"))


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
    # enough pre-training work that the kill lands after a checkpoint and before the end
    sets = [f"--set={s}" for s in TINY if not s.startswith(("source_per_class", "pretrain_epochs", "width"))]
    sets += ["--set=source_per_class=200", "--set=pretrain_epochs=8", "--set=width=16"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _cli("run", "fmnist-transfer", "--seeds", "1", "--out", str(ref), *sets).returncode == 0

    env = {**os.environ, "TRANSFERLAB_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "run", "fmnist-transfer", "--seeds", "1",
                             "--out", str(killed), *sets], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    runs = killed / "fmnist-transfer" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/finetune-seed0/checkpoint.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(runs.glob("*/finetune-seed0/checkpoint.pt")), "the run finished before a checkpoint was seen"
    res = _cli("run", "fmnist-transfer", "--seeds", "1", "--out", str(killed), *sets)
    assert res.returncode == 0, res.stderr
    assert "resuming from checkpoint" in res.stdout
    assert _metrics(killed / "fmnist-transfer" / "results.jsonl") == _metrics(ref / "fmnist-transfer" /
                                                                                 "results.jsonl")


@pytest.mark.parametrize("args, msg", [
    (["run", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
    (["run", "fmnist-transfer", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["run", "fmnist-transfer", "--set", "shots=many"], "expected int"),
    (["run", "fmnist-transfer", "--set", "arms=finetune,nope"], "unknown arm"),
    (["run", "fmnist-transfer", "--profile", "huge"], "no profile 'huge'"),
    (["bench", "no-such-bench"], "unknown benchmark"),
])
def test_bad_input_is_one_line_exit_2(args, msg, tmp_path, capsys):
    rc = main([*args, "--out", str(tmp_path)] if args[0] == "run" else args)
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_source_is_one_line_exit_2(tmp_path):
    res = _cli("run", "fmnist-transfer", "--out", str(tmp_path / "r"), "--set", f"data_path={tmp_path}")
    assert res.returncode == 2
    assert "does not contain" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not apply")
def test_unwritable_results_folder_nonroot(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    res = _cli("run", "fmnist-transfer", "--out", str(ro / "x"))
    assert res.returncode == 2 and "not writable" in res.stderr


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    res = _cli("run", "fmnist-transfer", "--out", str(blocker / "results"))
    assert res.returncode == 2
    assert "not writable" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_list_names_the_example(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fmnist-transfer" in out and "benchmarks:" in out


def test_demo_rejects_unknown_experiment_before_running(tmp_path, capsys):
    assert main(["demo", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
