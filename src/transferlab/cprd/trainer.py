"""`DualEncoderTrainer`: a dual encoder trained with InfoNCE (+ a distillation term) from a teacher.

A DomainBed-style contract: `update(images, texts, positive_mask)` does one optimisation step and
returns floats; `similarity(images, texts)` scores a gallery. The teacher is a callable
`teacher(images, texts, rows, cols) -> scores` over the batch's raw inputs, called only on the
pairs the objective asks for and always under `no_grad` (no gradient ever reaches the teacher).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .model import ContrastiveDistillLoss, InfoNCELoss


class DualEncoder(nn.Module):
    """Two towers and a learnable temperature; embeddings are L2-normalised (cosine similarity)."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, init_tau: float = 0.07,
                 learn_tau: bool = True, min_tau: float = 0.01):
        super().__init__()
        if init_tau <= 0:
            raise UserError(f"init_tau must be positive, got {init_tau}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau)), requires_grad=learn_tau)
        self.min_tau = min_tau  # ALBEF/CLIP clamp the temperature so logits cannot blow up

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=self.min_tau)

    def encode_images(self, x) -> torch.Tensor:
        return F.normalize(self.image_encoder(x), dim=-1)

    def encode_texts(self, x) -> torch.Tensor:
        return F.normalize(self.text_encoder(x), dim=-1)


class DualEncoderTrainer:
    """Trains a `DualEncoder` with a `ContrastiveDistillLoss` (InfoNCE, CPRD, KL, margin-MSE, ListNet).

    Args:
        model: the dual encoder.
        loss: the objective; default plain InfoNCE.
        teacher: optional `(images, texts, rows, cols) -> scores` for index pairs of the batch.
        lr, weight_decay: AdamW settings.
        warmup_steps: linear warm-up of the distillation weight λ (0 = off; reconstructed option).
        device: where the model lives (defaults to its parameters' device).
    """

    def __init__(self, model: DualEncoder, loss: ContrastiveDistillLoss | None = None,
                 teacher: Callable | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 0, device: torch.device | str | None = None):
        self.model = model
        self.loss = loss or InfoNCELoss()
        self.teacher = teacher
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the dual encoder has no trainable parameters")
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.warmup_steps = warmup_steps
        self.step = 0

    def _teacher_for(self, images, texts):
        if self.teacher is None:
            return None
        teacher = self.teacher

        def score(rows, cols):
            return teacher(images, texts, rows, cols)

        return score

    def update(self, images, texts, positive_mask: torch.Tensor | None = None) -> dict[str, float]:
        """One step on a batch; positive_mask [n_images, n_texts] defaults to the identity (pairs)."""
        self.model.train()
        zi, zt = self.model.encode_images(images), self.model.encode_texts(texts)
        sim = zi @ zt.t()
        if positive_mask is None:
            if sim.shape[0] != sim.shape[1]:
                raise UserError("positive_mask is required when the batch is not aligned image/text pairs")
            positive_mask = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        weight = None
        if self.warmup_steps > 0:
            weight = self.loss.config.weight * min(1.0, (self.step + 1) / self.warmup_steps)
        out = self.loss(sim, positive_mask.to(sim.device), self._teacher_for(images, texts), self.model.tau,
                        weight=weight)
        if not torch.isfinite(out["loss"]):
            raise UserError(f"non-finite loss at step {self.step}; lower the learning rate or check the inputs")
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.opt.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in out.items()} | {"tau": float(self.model.tau.detach())}

    @torch.no_grad()
    def embed(self, x, kind: str, batch_size: int = 512) -> torch.Tensor:
        self.model.eval()
        enc = self.model.encode_images if kind == "image" else self.model.encode_texts
        n = len(x)
        return torch.cat([enc(x[i:i + batch_size]) for i in range(0, n, batch_size)])

    @torch.no_grad()
    def similarity(self, images, texts, batch_size: int = 512) -> torch.Tensor:
        """[n_images, n_texts] cosine similarities of a gallery."""
        return self.embed(images, "image", batch_size) @ self.embed(texts, "text", batch_size).t()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        if "loss" in state:  # the objective's own state (the random-order control's stream)
            self.loss.load_state_dict(state["loss"])
