"""The Meta-DMoE aggregator: a small transformer that fuses expert features into one teacher feature.

Official `src/transformer.py` ("fa_selector"): tokens are the experts' pooled penultimate features,
[B, N, D]; `depth` pre-LayerNorm blocks (self-attention, then an MLP D -> 2D -> D with GELU);
no positional embedding and no class token; the output is the mean over tokens. Hence the teacher
is invariant to the order of the experts and accepts any number of them (N-1 while the episode's
own expert is masked, N at test time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError


class _SelfAttention(nn.Module):
    """Multi-head self-attention written out, so padding masks and double backward are explicit."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [B, H, N, N]
        if pad is not None:  # padded experts are never attended to
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        att = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x, pad):
        x = x + self.attn(self.norm1(x), pad)
        return x + self.mlp(self.norm2(x))


class Aggregator(nn.Module):
    """Fuse N expert features [B, N, D] into one teacher feature [B, D] (paper Sec. 3.2, Fig. 2).

    Args:
        dim: expert feature size D (must equal the student's feature size).
        depth: transformer blocks (official: 1).
        heads: attention heads; must divide `dim` (official: 16 for D = 1024/2048).
        mlp_ratio: MLP width / D (official: 2).
        dropout: dropout in attention and MLP (official: 0.1; off in eval mode).
        num_classes: adds the LayerNorm + Linear head used only for cross-entropy pre-training.
        zero_init: [reconstructed] zero the last layer of every residual branch, so that before training the
            teacher is exactly the plain average of the expert features (the official code uses PyTorch's
            default init; it keeps the aggregator near its init with learning rates ~1e-6 instead).
    """

    def __init__(self, dim: int, depth: int = 1, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1,
                 num_classes: int | None = None, zero_init: bool = True):
        super().__init__()
        if dim < 1 or depth < 1 or heads < 1:
            raise UserError(f"Aggregator needs dim, depth, heads >= 1, got dim={dim}, depth={depth}, heads={heads}")
        if dim % heads:
            raise UserError(f"Aggregator: heads={heads} must divide dim={dim}; pick e.g. heads="
                            f"{max(h for h in range(1, min(dim, 16) + 1) if dim % h == 0)}")
        self.dim = dim
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        if zero_init:
            for b in self.blocks:
                for lin in (b.attn.out, b.mlp[3]):
                    nn.init.zeros_(lin.weight)
                    nn.init.zeros_(lin.bias)
        self.classifier = (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
                           if num_classes is not None else None)

    def features(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher feature: mean over (unpadded) expert tokens after the transformer blocks.

        `key_padding_mask` is [B, N] bool, True where an expert is absent; the result then equals
        running on the present experts only.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise UserError(f"Aggregator expects tokens of shape [batch, experts, {self.dim}], "
                            f"got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise UserError("Aggregator needs at least one expert token")
        pad = key_padding_mask
        if pad is not None:
            if pad.shape != tokens.shape[:2] or pad.dtype != torch.bool:
                raise UserError(f"key_padding_mask must be a bool tensor of shape {tuple(tokens.shape[:2])}")
            if pad.all(dim=1).any():
                raise UserError("key_padding_mask masks every expert of some row; keep at least one")
        x = tokens
        for block in self.blocks:
            x = block(x, pad)
        if pad is None:
            return x.mean(dim=1)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits, for the aggregator's cross-entropy pre-training only."""
        if self.classifier is None:
            raise UserError("this Aggregator has no classification head; build it with num_classes=...")
        return self.classifier(self.features(tokens, key_padding_mask))
