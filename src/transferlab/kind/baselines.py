"""PEFT baselines for the KIND experiment on a dense DiT: LoRA and SVDiff-like singular-value tuning.

Both wrap a frozen `nn.Linear` (the same projections KIND decomposes) and add few trainable parameters:

- LoRA (Hu et al. 2021): W x + (alpha / r) B A x, A random, B = 0, so training starts at the
  pre-trained model.
- class-gated LoRA (a control for KIND, not a published method): LoRA whose rank components are
  switched per class by KIND's `ClassGate` (the null label gets none), i.e. KIND's transfer
  structure on a dense pre-trained model.
- SVDiff (Han et al. 2023, "spectral shift"): W = U diag(relu(sigma + delta)) V^T with U, sigma, V
  the frozen SVD of the pre-trained weight and only delta (one number per singular value) trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .gate import ClassGate
from .layer import GateContext
from .model import SUFFIX_ROLES, _num_classes, _set_module

ALL_ROLES = ("qkv", "q", "k", "v", "o", "fc1", "fc2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling


class GatedLoRALinear(LoRALinear):
    """LoRA whose rank components are masked per sample by a `GateContext` (set by a `ClassGate` hook).

    y = W x + (alpha / r) B diag(m) A x with m the sample's {0,1}^r gate row; no context = all on.
    """

    def __init__(self, base: nn.Linear, rank: int, ctx: GateContext, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A)
        masks = self.ctx.masks
        if masks is not None:
            m = masks[self.ctx.inverse].to(h.dtype)  # (B, r)
            h = h * m.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return self.base(x) + F.linear(h, self.B) * self.scaling


class SVDiffLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(base.weight.detach().double(), full_matrices=False)
        dt = base.weight.dtype
        self.register_buffer("U", U.to(dt))
        self.register_buffer("S", S.to(dt))
        self.register_buffer("Vh", Vh.to(dt))
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))

    def sigma_parameters(self):
        """The spectral shift: the parameter SVDiff's larger learning rate applies to."""
        return [self.delta]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.U * F.relu(self.S + self.delta)) @ self.Vh
        return F.linear(x, w, self.bias)


def _targets(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() for suf, role in SUFFIX_ROLES.items()
            if isinstance(m, nn.Linear) and (n == suf or n.endswith("." + suf)) and role in ALL_ROLES]


def lora_params_per_rank(model: nn.Module) -> int:
    """Trainable LoRA parameters per unit of rank over all DiT projections: sum of (in + out)."""
    return sum(m.in_features + m.out_features for _, m in _targets(model))


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Wrap every DiT projection (fused qkv as one layer) in LoRA, in place; base weights are frozen."""
    for n, m in _targets(model):
        _set_module(model, n, LoRALinear(m, rank, alpha))
    return model


def apply_gated_lora(model: nn.Module, rank: int, k_active: int | None = None, assignment: str = "block",
                     seed: int = 0, alpha: float | None = None, num_classes: int | None = None) -> nn.Module:
    """Class-gated LoRA on every DiT projection, in place: a `ClassGate` over the `rank` components
    (k_active per class, disjoint blocks by default; the null label uses the frozen model alone) is
    hooked on the model's forward, as `transferlab.kind.convert` does for tailors."""
    if isinstance(getattr(model, "kind_gate", None), ClassGate):
        raise UserError("this model already has a class gate (KIND or gated LoRA)")
    n = _num_classes(model) if num_classes is None else num_classes
    gate = ClassGate(n, rank, k_active, assignment, seed)
    for name, m in _targets(model):
        _set_module(model, name, GatedLoRALinear(m, rank, gate.ctx, alpha))
    model.kind_gate = gate.to(next(model.parameters()).device)
    gate.attach(model)
    return model


def apply_svdiff(model: nn.Module) -> nn.Module:
    """Replace every DiT projection by its frozen SVD with a trainable singular-value shift, in place."""
    for n, m in _targets(model):
        _set_module(model, n, SVDiffLinear(m))
    return model
