"""Two CPU processes under `accelerate launch` give the single-process metrics within tolerance."""

import os
import shutil
import subprocess
import sys

import pytest

from transferlab.core.io import read_jsonl

# Two processes see the same data split across ranks (gradients averaged; BatchNorm statistics are
# per rank), so runs are close but not bitwise equal. The tolerance is in accuracy points.
TOLERANCE_POINTS = 8.0


@pytest.mark.slow
def test_accelerate_two_processes_matches_single(tmp_path):
    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                              "accelerate")):
        pytest.skip("accelerate CLI not installed")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    # the documented command on the real data, not the vendored subset the other tests use
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERLAB_DATA"} | {"TRANSFERLAB_THREADS": "1"}
    common = ["run", "fmnist-transfer", "--profile", "quick", "--seeds", "1", "--set", "arms=finetune,linear_probe"]
    single = subprocess.run([sys.executable, "-m", "transferlab", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr
    # Accelerate's `--cpu` flag alone starts one process unless an MPI hostfile is given (its simple
    # launcher); `--multi_gpu` on a machine without CUDA starts torchrun workers that use gloo on CPU.
    multi = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "-m", "transferlab", *common,
                            "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = {r["arm"]: r for r in read_jsonl(tmp_path / "one" / "fmnist-transfer" / "results.jsonl")}
    two = {r["arm"]: r for r in read_jsonl(tmp_path / "two" / "fmnist-transfer" / "results.jsonl")}
    assert set(one) == set(two) == {"finetune", "linear_probe"}
    assert all(r["processes"] == 2 for r in two.values())
    for arm in one:
        assert abs(one[arm]["metrics"]["test_acc"] - two[arm]["metrics"]["test_acc"]) <= TOLERANCE_POINTS
