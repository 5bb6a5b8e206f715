"""Per-layer forward patches: GPM's input-side projection and TRGP's scaled weight projection.

Input-side projection (bias-free nn.Linear). The weight gradient of y = x W^T is
g = dy^T x, so g (I - M M^T) = dy^T (x (I - M M^T)): projecting the (batch x m) input in the
backward pass gives exactly GPM's projected weight gradient, and costs batch*m*r instead of
out*m*r (~10x cheaper at PMNIST's batch 10, out 100). The forward output is untouched.
The identity needs no bias (a bias gradient is never projected, and GPM uses bias-free layers).

Scaled weight projection (TRGP, Lin et al. ICLR 2022, Sec. 4.2): for selected old bases U_s,
W_eff = W + sum_s W U_s (Q_s - I) U_s^T. For Linear layers this is applied on the input side,
x_hat = x + sum_s (x U_s)(Q_s - I)^T U_s^T, and y = x_hat W^T (same output, cheaper than forming
W_eff when batch < out); for Conv2d W_eff is formed explicitly (weights are small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ProjectedInputLinear(torch.autograd.Function):
    """y = x W^T; backward gives dL/dW computed from the input projected off span(M)."""

    @staticmethod
    def forward(ctx, x, weight, basis, keep):
        ctx.save_for_backward(x, weight, basis)
        ctx.keep = keep
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, gy):
        x, weight, basis = ctx.saved_tensors
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            xp = (x2 @ basis) @ basis.T
            if not ctx.keep:  # "sub": x - x M M^T ; "keep": x N N^T with N the complement basis
                xp = x2 - xp
            gw = gy.reshape(-1, gy.shape[-1]).T @ xp
        return gx, gw, None, None


class _CachedInputLinear(torch.autograd.Function):
    """y = x W^T; backward gives dL/dW = dy^T x_p from a precomputed projected input x_p.

    Within a task the basis is fixed, so x (I - M M^T) of each training input is fixed too: computed
    once per task, the projected weight gradient costs exactly what the plain one does."""

    @staticmethod
    def forward(ctx, x, weight, xp):
        ctx.save_for_backward(weight, xp)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, gy):
        weight, xp = ctx.saved_tensors
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).T @ xp.reshape(-1, xp.shape[-1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def projected_linear(x: torch.Tensor, weight: torch.Tensor, factor: tuple[str, torch.Tensor]) -> torch.Tensor:
    mode, basis = factor
    return _ProjectedInputLinear.apply(x, weight, basis, mode == "keep")


class LayerPatch:
    """State that a strategy attaches to one Linear/Conv2d layer; replaces its forward while attached.

    Fields: `factor` (GPM projection factor, used by the input-side path when not None),
    `scales`, a list of (U, Q) pairs for TRGP's scaled weight projection (empty = plain layer), and
    `cached`, a projected copy of the next forward's input (used once, then cleared).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.factor: tuple[str, torch.Tensor] | None = None
        self.scales: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cached: torch.Tensor | None = None
        # True once a forward since the last `after_backward` left the weight gradient unprojected
        # (plain path); projecting twice is harmless, skipping a needed projection is not.
        self.unprojected = True
        module.forward = self.forward  # instance attribute shadows the class's forward

    def detach(self) -> None:
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.module
        if isinstance(mod, nn.Linear):
            xp, self.cached = self.cached, None
            if xp is not None and not self.scales and mod.bias is None:
                if xp.shape != x.shape:
                    raise ValueError(f"cached projected input has shape {tuple(xp.shape)} but the layer got "
                                     f"{tuple(x.shape)}; pass the projected rows of exactly this batch")
                return _CachedInputLinear.apply(x, mod.weight, xp)
            x0 = x  # a sum over selected bases, each applied to the original input
            for U, Q in self.scales:
                Qm = Q - torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
                x = x + ((x0 @ U) @ Qm.T) @ U.T
            # input-side projection costs rows*m*k, the weight-gradient one out*m*k: use the cheaper
            if self.factor is not None and mod.bias is None and x.numel() // x.shape[-1] <= mod.out_features:
                return projected_linear(x, mod.weight, self.factor)
            self.unprojected = True
            return F.linear(x, mod.weight, mod.bias)
        self.unprojected = True
        w = mod.weight
        if self.scales:
            w0 = w.reshape(w.shape[0], -1)
            w2 = w0
            for U, Q in self.scales:
                Qm = Q - torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
                w2 = w2 + ((w0 @ U) @ Qm) @ U.T
            w = w2.reshape(w.shape)
        return mod._conv_forward(x, w, mod.bias)
