"""Channels-last execution of image batches: why Meta-DMoE's `adapt` is cheap on CPU.

`adapt` runs every frozen expert forward on the support batch, so their cost dominates it. On CPU
(PyTorch 2.13, one thread, [64, 16, 28, 28] activations) the NCHW kernels of the small CNNs are slow:
max-pooling takes ~4.5 ms vs ~0.4 ms channels-last, a 1-input-channel convolution ~3.6 ms vs ~0.5 ms.
Running the *same* modules on a channels-last input batch gives the same values up to float rounding
(~1e-7 relative): a convolution whose input is channels-last returns channels-last output, and batch
norm, ReLU and pooling keep that layout, so converting the input is enough. The modules and their
weights are never touched (no copy, no cache to invalidate). Measured numbers: docs/metadmoe.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def wants_channels_last(x: torch.Tensor, policy: bool | None) -> bool:
    """Whether to run batch `x` channels-last: `policy` True/False forces it, None = only 4-D batches on CPU.

    Auto is CPU-only because there NCHW pooling/convolution is the slow path; on GPUs (cuDNN) NCHW is
    not pathological and we leave the user's layout alone.
    """
    if x.dim() != 4 or policy is False:
        return False
    return policy is True or x.device.type == "cpu"


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A copy of the 4-D batch `x` with channels-last strides, also for a single channel.

    `x.contiguous(memory_format=torch.channels_last)` is a no-op for C = 1 (NCHW strides already pass
    the channels-last contiguity check), and the convolution then stays on the slow NCHW path;
    allocating with explicit channels-last strides avoids that. Returns `x` itself if it already has them.
    """
    _, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


class Layout:
    """A model's layout policy (None = auto, True, False) plus what auto learned about its backbones.

    Some backbones cannot take a channels-last batch, e.g. `h.view(B, -1)` after a convolution with
    more than one channel raises. Under auto, `run` then repeats the call in NCHW and stays NCHW for
    this model; with `policy=True` the error is raised. Only pure computations (no weight updates)
    are run through `run`, so repeating one is safe.
    """

    def __init__(self, policy: bool | None = None):
        self.policy, self.works = policy, True

    def wants(self, x: torch.Tensor) -> bool:
        return self.works and wants_channels_last(x, self.policy)

    def run(self, fn: Callable[[torch.Tensor], T], x: torch.Tensor) -> T:
        if not self.wants(x):
            return fn(x)
        try:
            return fn(to_channels_last(x))
        except RuntimeError:
            if self.policy is True:
                raise
            out = fn(x)  # if NCHW fails too, that error is the user's real problem and propagates
            self.works = False
            return out
