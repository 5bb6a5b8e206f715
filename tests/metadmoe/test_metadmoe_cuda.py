"""CUDA path: adapt and one meta-step on the GPU agree with the CPU (not run on CPU-only machines)."""

import pytest
import torch

from .helpers import batch, make

pytestmark = pytest.mark.cuda


def test_adapt_and_meta_step_match_cpu_on_cuda():
    cpu, gpu = make(), make().cuda()
    x, _ = batch(16)
    xq, yq = batch(16, seed=2)
    torch.testing.assert_close(gpu.adapt(x.cuda()).predict(xq.cuda()).cpu(), cpu.adapt(x).predict(xq),
                               atol=1e-8, rtol=1e-6)
    a = cpu.meta_loss(x, xq, yq, 0)[0]
    b = gpu.meta_loss(x.cuda(), xq.cuda(), yq.cuda(), 0)[0]
    torch.testing.assert_close(b.cpu(), a, atol=1e-8, rtol=1e-6)
    with pytest.raises(ValueError, match="move it with"):
        gpu.adapt(x)  # a CPU batch for a GPU model gets a clear error


@pytest.mark.parametrize("channels_last", [None, True])
def test_cnn_adapt_on_cuda_matches_cpu_in_either_layout(channels_last):
    from .test_metadmoe_layout import cnn_model, images

    cpu, gpu = cnn_model(), cnn_model(channels_last).cuda()
    x, xq = images(), images(seed=2)
    torch.testing.assert_close(gpu.adapt(x.cuda()).predict(xq.cuda()).cpu(), cpu.adapt(x).predict(xq),
                               atol=1e-8, rtol=1e-6)
