"""Metric functions against accuracy matrices worked out by hand."""

import math

import pytest

from transferlab.core.errors import UserError
from transferlab.cuber.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summarize

# R[i][j]: accuracy on task j after training task i.
R = [[80.0, 10.0, 20.0],
     [70.0, 90.0, 30.0],
     [60.0, 85.0, 95.0]]
B = [10.0, 12.0, 25.0]
# Old tasks improve, task 0 peaks in the middle: forgetting differs from -BWT.
R_UP = [[50.0, 0.0, 0.0],
        [70.0, 60.0, 0.0],
        [65.0, 70.0, 80.0]]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((60 + 85 + 95) / 3)


def test_backward_transfer_by_hand():
    assert backward_transfer(R) == pytest.approx(((60 - 80) + (85 - 90)) / 2)  # -12.5
    assert backward_transfer(R_UP) == pytest.approx(((65 - 50) + (70 - 60)) / 2)  # +12.5


def test_forward_transfer_by_hand():
    assert forward_transfer(R, B) == pytest.approx(((10 - 12) + (30 - 25)) / 2)  # 1.5


def test_forgetting_uses_best_earlier_accuracy():
    assert forgetting(R) == pytest.approx(((80 - 60) + (90 - 85)) / 2)  # 12.5 = -BWT here
    assert forgetting(R_UP) == pytest.approx(((70 - 65) + (60 - 70)) / 2)  # -2.5, while BWT is +12.5


def test_summary_and_tensor_input():
    import torch

    s = summarize(torch.tensor(R), B)
    assert s["acc"] == pytest.approx(80.0) and s["bwt"] == pytest.approx(-12.5) and s["fwt"] == pytest.approx(1.5)
    assert math.isnan(summarize(R)["fwt"])


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [[1.0]], "abc"])
def test_bad_matrices_raise(bad):
    with pytest.raises(UserError):
        backward_transfer(bad)


def test_fwt_needs_one_baseline_per_task():
    with pytest.raises(UserError, match="one accuracy per task"):
        forward_transfer(R, [1.0, 2.0])
