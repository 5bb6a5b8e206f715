"""Baselines in DomainBed's small `update()` / `predict()` style: ERM, BN-adapt and TENT.

ERM trains on labeled source batches. BN-adapt and TENT are test-time methods that work on a copy
of a trained model, so the source model is never modified:
- BN-adapt (Schneider et al. 2020; "BN-norm" in TENT) normalises each test batch with its own
  statistics; it has nothing to learn (`update` is a no-op).
- TENT (Wang et al., ICLR 2021) also uses batch statistics and takes entropy-minimisation steps on
  the BatchNorm affine parameters only (official `configure_model` / `collect_params`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .model import check_backbone, check_batch

_BN = nn.modules.batchnorm._BatchNorm


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.head(model.features(x))


def _batch_stats_copy(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers always normalise with the current batch's statistics."""
    check_backbone(model, "model")
    m = copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, _BN)]
    if not bns:
        raise UserError(f"{type(model).__name__} has no BatchNorm layer; BN-adapt and TENT need one "
                        "(e.g. SmallCNN(batchnorm=True))")
    for b in bns:
        # without running statistics BN uses batch statistics in train and eval mode alike (as TENT does)
        b.track_running_stats = False
        b.running_mean, b.running_var, b.num_batches_tracked = None, None, None
    return m.eval()


class ERM:
    """Empirical risk minimisation: `update(x, y)` is one Adam step of cross-entropy."""

    def __init__(self, model: nn.Module, lr: float = 1e-3):
        check_backbone(model, "model")
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        check_batch(x, "x")
        self.model.train()
        loss = F.cross_entropy(_logits(self.model, x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x")
        was = self.model.training
        self.model.eval()
        try:
            return _logits(self.model, x)
        finally:
            self.model.train(was)


class BNAdapt:
    """Test-batch normalisation statistics; a copy of `model`, which itself is left untouched."""

    def __init__(self, model: nn.Module):
        self.model = _batch_stats_copy(model)

    def update(self, x: torch.Tensor) -> dict:
        check_batch(x, "x")
        return {}  # nothing to learn: statistics are recomputed for every batch in predict

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x")
        if x.shape[0] < 2:
            raise UserError("BN-adapt needs at least 2 test samples per batch to estimate statistics")
        return _logits(self.model, x)


class Tent:
    """TENT: entropy minimisation on BN affine parameters with test-batch statistics.

    Args:
        model: a trained backbone with `features`/`head` and BatchNorm layers (copied, not modified).
        lr: Adam learning rate (official CIFAR-10-C: 1e-3).
        steps: entropy steps per `update` call (official: 1).
        episodic: `reset()` before every `update`, so each batch adapts from the source model. The default
            (official) is online: adaptation carries over from batch to batch; create a new `Tent` (or
            call `reset()`) at the start of each target domain.

    `predict` runs after the update. (The official `forward` returns the outputs computed *before*
    its step, which in episodic one-step mode equals BN-adapt; we evaluate the adapted model.)
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False):
        if lr <= 0 or steps < 1:
            raise UserError(f"Tent needs lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
        self.model = _batch_stats_copy(model)
        self.lr, self.steps, self.episodic = lr, steps, episodic
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = []
        for b in self.model.modules():
            if isinstance(b, _BN) and b.affine:
                b.weight.requires_grad_(True)
                b.bias.requires_grad_(True)
                self.params += [b.weight, b.bias]
        if not self.params:
            raise UserError("Tent needs BatchNorm layers with affine=True (it adapts their scale and shift)")
        self._initial = copy.deepcopy(self.model.state_dict())
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def reset(self) -> None:
        self.model.load_state_dict(self._initial)
        self.opt = torch.optim.Adam(self.params, lr=self.lr)

    def update(self, x: torch.Tensor) -> dict:
        """Entropy-minimisation step(s) on one unlabeled batch."""
        check_batch(x, "x")
        if x.shape[0] < 2:
            raise UserError("TENT needs at least 2 test samples per batch to estimate BN statistics")
        if self.episodic:
            self.reset()
        with torch.enable_grad():  # callers may evaluate under no_grad
            for _ in range(self.steps):
                logp = _logits(self.model, x).log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1).mean()
                self.opt.zero_grad(set_to_none=True)
                entropy.backward()
                self.opt.step()
        return {"entropy": entropy.item()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x")
        return _logits(self.model, x)
