"""GPU path: bases, projection and the input-side Linear projection agree with the CPU (not run without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.cuber import GPM, GPMConfig

pytestmark = pytest.mark.cuda


def test_gpm_on_cuda_matches_cpu():
    torch.manual_seed(0)
    x = torch.randn(64, 32) @ torch.randn(32, 32).tril()
    y = torch.randint(0, 4, (64,))
    grads = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).to(dev)
        strat = GPM(model, GPMConfig(thresholds=(0.9,)))
        ld = [(x.to(dev), y.to(dev))]
        strat.before_task(0, ld)
        strat.after_task(0, ld)
        strat.before_task(1, ld)
        model.zero_grad()
        F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
        strat.after_backward(model)
        grads[dev] = model[0].weight.grad.cpu()
        M = strat.memory.bases["0"]
        assert M.device.type == dev and (model[0].weight.grad @ M).norm() <= 1e-5 * model[0].weight.grad.norm()
    assert torch.allclose(grads["cpu"], grads["cuda"], atol=1e-4)
