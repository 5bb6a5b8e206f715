"""`KindLinear`: a linear layer stored as rank-1 components, learngenes shared and tailors class-gated.

    y = U_g ((V_g^T x) * s_g) + U_t ((V_t^T x) * s_t * m) + b

where m in {0,1}^{n_tailor} is the class gate's mask for each sample (read from a `GateContext`
shared by all layers of a converted model, so a mixed-class batch is routed per sample). With no
context every tailor is active. A masked tailor contributes nothing and receives exactly zero
gradient, which is what lets learngenes absorb class-agnostic knowledge (KIND abstract;
DivControl §3.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError

LEARNGENE_PARAMS = ("U_g", "s_g", "V_g")
TAILOR_PARAMS = ("U_t", "s_t", "V_t")


class GateContext:
    """Per-forward routing shared by all KindLinear layers of one model (set by the model's pre-hook).

    `masks` (G, n_tailor) are the distinct masks in the batch and `inverse` (B,) maps each sample to
    its row, so a layer can materialise one dense matrix per distinct mask instead of per sample.
    """

    def __init__(self):
        self.masks: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None

    def set(self, masks: torch.Tensor, inverse: torch.Tensor) -> None:
        self.masks, self.inverse = masks, inverse

    def clear(self) -> None:
        self.masks = self.inverse = None


def _orthonormal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns (or rows, if cols > rows)."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, uniformly distributed (Haar)
    return (q if rows >= cols else q.T).float()


class KindLinear(nn.Module):
    """Linear map W = U diag(s) V^T split into `n_learngene` shared and `n_tailor` class-gated components.

    Args:
        in_features, out_features: as `nn.Linear`.
        n_learngene, n_tailor: components of each kind; their sum may exceed min(in, out) only with
            `allow_overcomplete=True` (the extra components would be linearly dependent).
        compute: "factored", "dense" or "auto" (see `KindConfig.compute`).
    """

    def __init__(self, in_features: int, out_features: int, n_learngene: int, n_tailor: int, bias: bool = True,
                 allow_overcomplete: bool = False, compute: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise UserError(f"KindLinear needs positive sizes, got in={in_features}, out={out_features}")
        if n_learngene < 0 or n_tailor < 0 or n_learngene + n_tailor < 1:
            raise UserError(f"n_learngene={n_learngene}, n_tailor={n_tailor}: need >= 0 each and >= 1 in total")
        full = min(in_features, out_features)
        if n_learngene + n_tailor > full and not allow_overcomplete:
            raise UserError(f"n_learngene + n_tailor = {n_learngene + n_tailor} exceeds min(in, out) = {full} "
                            f"for a {in_features}->{out_features} layer; lower them or pass allow_overcomplete=True")
        if compute not in ("auto", "factored", "dense"):
            raise UserError(f"compute must be auto, factored or dense, got {compute!r}")
        self.in_features, self.out_features = in_features, out_features
        self.n_learngene, self.n_tailor = n_learngene, n_tailor
        self.allow_overcomplete, self.compute = allow_overcomplete, compute
        self.ctx: GateContext | None = None  # set by `convert`; not a submodule, not saved
        r = n_learngene + n_tailor
        self.U_g = nn.Parameter(torch.empty(out_features, n_learngene))
        self.s_g = nn.Parameter(torch.empty(n_learngene))
        self.V_g = nn.Parameter(torch.empty(in_features, n_learngene))
        self.U_t = nn.Parameter(torch.empty(out_features, n_tailor))
        self.s_t = nn.Parameter(torch.empty(n_tailor))
        self.V_t = nn.Parameter(torch.empty(in_features, n_tailor))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():
            U, V = _orthonormal(out_features, r, generator), _orthonormal(in_features, r, generator)
            self.U_g.copy_(U[:, :n_learngene])
            self.U_t.copy_(U[:, n_learngene:])
            self.V_g.copy_(V[:, :n_learngene])
            self.V_t.copy_(V[:, n_learngene:])
            self.s_g.fill_(self.xavier_sigma())
            self.s_t.fill_(self.xavier_sigma())

    def xavier_sigma(self) -> float:
        """The s that gives U diag(s) V^T the Frobenius norm of a Xavier-initialised matrix [reconstructed].

        Xavier variance 2/(in+out) per entry -> ||W||_F^2 = 2 in out/(in+out) = sum_i s_i^2.
        """
        r = self.n_learngene + self.n_tailor
        return math.sqrt(2 * self.in_features * self.out_features / ((self.in_features + self.out_features) * r))

    @classmethod
    def from_linear(cls, linear: nn.Linear, n_learngene: int, n_tailor: int, allow_overcomplete: bool = False,
                    compute: str = "auto") -> KindLinear:
        """Exact SVD of a trained `nn.Linear`: top singular triplets become learngenes, the next ones tailors.

        At full rank (n_learngene + n_tailor = min(in, out)) the layer reproduces `linear` exactly.
        """
        out_f, in_f = linear.weight.shape
        layer = cls(in_f, out_f, n_learngene, n_tailor, bias=linear.bias is not None,
                    allow_overcomplete=allow_overcomplete, compute=compute)
        layer = layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            P, S, Qh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
            k = min(len(S), n_learngene + n_tailor)
            U = torch.zeros(out_f, n_learngene + n_tailor, dtype=torch.float64)
            V = torch.zeros(in_f, n_learngene + n_tailor, dtype=torch.float64)
            s = torch.zeros(n_learngene + n_tailor, dtype=torch.float64)  # components past the rank: s = 0
            U[:, :k], V[:, :k], s[:k] = P[:, :k], Qh[:k].T, S[:k]
            dt = linear.weight.dtype
            layer.U_g.copy_(U[:, :n_learngene].to(dt))
            layer.U_t.copy_(U[:, n_learngene:].to(dt))
            layer.V_g.copy_(V[:, :n_learngene].to(dt))
            layer.V_t.copy_(V[:, n_learngene:].to(dt))
            layer.s_g.copy_(s[:n_learngene].to(dt))
            layer.s_t.copy_(s[n_learngene:].to(dt))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    # ---- parameters by role -----------------------------------------------------------------
    def learngene_parameters(self):
        return [self.U_g, self.s_g, self.V_g]

    def tailor_parameters(self):
        return [self.U_t, self.s_t, self.V_t]

    def sigma_parameters(self):
        """The singular values, which optimisers may give their own learning rate (`kind_param_groups`)."""
        return [self.s_g, self.s_t]

    @torch.no_grad()
    def select_learngenes_by_sigma(self) -> None:
        """Make the `n_learngene` components of largest |s| the learngenes (the rest become tailors).

        For a model pre-trained without a gate the split into learngenes and tailors is arbitrary; the
        components that carry the most of W are the natural ones to keep.
        """
        U = torch.cat([self.U_g, self.U_t], 1)
        s = torch.cat([self.s_g, self.s_t])
        V = torch.cat([self.V_g, self.V_t], 1)
        order = torch.argsort(s.abs(), descending=True, stable=True)
        g, t = order[:self.n_learngene], order[self.n_learngene:]
        self.U_g.copy_(U[:, g]), self.s_g.copy_(s[g]), self.V_g.copy_(V[:, g])
        self.U_t.copy_(U[:, t]), self.s_t.copy_(s[t]), self.V_t.copy_(V[:, t])

    @torch.no_grad()
    def reset_tailors(self, n_tailor: int | None = None, scale: float = 1.0,
                      generator: torch.Generator | None = None) -> None:
        """Replace the tailors by `n_tailor` new random ones (orthonormal factors, s = scale * Xavier s)."""
        n = self.n_tailor if n_tailor is None else n_tailor
        if n < 0 or (self.n_learngene + n > min(self.in_features, self.out_features) and not self.allow_overcomplete):
            raise UserError(f"n_tailor={n} with n_learngene={self.n_learngene} does not fit a "
                            f"{self.in_features}->{self.out_features} layer (allow_overcomplete is off)")
        dev, dt = self.U_g.device, self.U_g.dtype
        self.n_tailor = n
        self.U_t = nn.Parameter(_orthonormal(self.out_features, n, generator).to(dev, dt))
        self.V_t = nn.Parameter(_orthonormal(self.in_features, n, generator).to(dev, dt))
        self.s_t = nn.Parameter(torch.full((n,), scale * self.xavier_sigma(), device=dev, dtype=dt))

    # ---- the map ------------------------------------------------------------------------------
    def dense_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """W = U_g diag(s_g) V_g^T + U_t diag(s_t * mask) V_t^T, shape (out, in)."""
        s_t = self.s_t if mask is None else self.s_t * mask.to(self.s_t.dtype)
        return (self.U_g * self.s_g) @ self.V_g.T + (self.U_t * s_t) @ self.V_t.T

    def _active(self, mask_row: torch.Tensor | None):
        """Factors restricted to learngenes + the tailors switched on by one mask row (saves FLOPs)."""
        if mask_row is None:
            idx = None
        else:
            idx = mask_row.nonzero().squeeze(1)
            if len(idx) == self.n_tailor:
                idx = None
        U_t, s_t, V_t = (self.U_t, self.s_t, self.V_t) if idx is None else \
            (self.U_t[:, idx], self.s_t[idx], self.V_t[:, idx])
        return torch.cat([self.U_g, U_t], 1), torch.cat([self.s_g, s_t]), torch.cat([self.V_g, V_t], 1)

    def _choose(self, tokens: int, groups: int, rank: int) -> str:
        if self.compute != "auto":
            return self.compute
        factored = tokens * rank * (self.in_features + self.out_features)
        dense = groups * self.in_features * self.out_features * rank + tokens * self.in_features * self.out_features
        return "factored" if factored < dense else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        masks = None if ctx is None else ctx.masks
        if masks is None or masks.shape[0] == 1:
            # one routing for the whole batch: drop inactive tailors, then one matmul pair or one F.linear
            U, s, V = self._active(None if masks is None else masks[0])
            if self._choose(x.numel() // self.in_features, 1, len(s)) == "dense":
                return F.linear(x, (U * s) @ V.T, self.bias)
            return F.linear((x @ V) * s, U, self.bias)
        if ctx.inverse.shape[0] != x.shape[0]:
            raise UserError(f"KindLinear got a batch of {x.shape[0]} but the class gate was set for "
                            f"{ctx.inverse.shape[0]} labels; call the converted model, not its layers, with labels")
        if self.compute == "auto":
            return self._gathered(x, masks, ctx.inverse)
        if self.compute == "factored":
            # per-sample scale vector: learngenes always on, tailors times the sample's mask
            m = masks[ctx.inverse].to(x.dtype)  # (B, n_tailor)
            scale = torch.cat([self.s_g.expand(len(m), -1), self.s_t * m], 1)
            scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
            U = torch.cat([self.U_g, self.U_t], 1)
            V = torch.cat([self.V_g, self.V_t], 1)
            return F.linear((x @ V) * scale, U, self.bias)
        # dense: one materialised matrix per distinct mask; samples are gathered by group and put back
        parts, index = [], []
        for g in range(masks.shape[0]):
            idx = (ctx.inverse == g).nonzero().squeeze(1)
            U, s, V = self._active(masks[g])
            parts.append(F.linear(x[idx], (U * s) @ V.T, self.bias))
            index.append(idx)
        order = torch.cat(index)
        return torch.cat(parts)[torch.argsort(order)]

    def _learngenes(self, x: torch.Tensor) -> torch.Tensor:
        """Learngene part plus bias, as one GEMM with W_g = U_g diag(s_g) V_g^T or factored if cheaper."""
        tokens = x.numel() // self.in_features
        factored = tokens * self.n_learngene * (self.in_features + self.out_features)
        dense = self.in_features * self.out_features * (self.n_learngene + tokens)
        if factored < dense:
            return F.linear((x @ self.V_g) * self.s_g, self.U_g, self.bias)
        return F.linear(x, (self.U_g * self.s_g) @ self.V_g.T, self.bias)

    def _gathered(self, x: torch.Tensor, masks: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """Mixed-class batch: learngenes as one product for all samples; each sample's own active tailors
        gathered into (B, in, k) / (B, k, out) factors and applied by two batched matmuls.

        k is the most tailors any mask in the batch switches on; masks with fewer are padded with
        inactive tailors weighted 0 (so they get exactly zero gradient). Cost: learngenes + k/n_tailor of
        the tailors, however many classes the batch holds.
        """
        y = self._learngenes(x)
        k = int(masks.sum(1).max().item())
        if k == 0:
            return y
        # active tailors first in each distinct mask, then padding; gathered per sample
        order = torch.argsort(masks, dim=1, descending=True, stable=True)[:, :k]  # (G, k)
        weight = masks.gather(1, order).to(x.dtype)
        idx, w = order[inverse].reshape(-1), weight[inverse]  # (B*k,), (B, k)
        b = x.shape[0]
        V = self.V_t.T.index_select(0, idx).view(b, k, self.in_features)
        U = self.U_t.T.index_select(0, idx).view(b, k, self.out_features)
        h = torch.bmm(x.reshape(b, -1, self.in_features), V.transpose(1, 2))  # (B, N, k)
        h = h * (self.s_t.index_select(0, idx).view(b, 1, k) * w.unsqueeze(1))
        return torch.baddbmm(y.reshape(b, -1, self.out_features), h, U).view(y.shape)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, learngenes={self.n_learngene}, "
                f"tailors={self.n_tailor}, bias={self.bias is not None}, compute={self.compute}")


class SplitQKV(nn.Module):
    """A fused qkv projection (width -> 3*width) as three separate layers whose outputs are concatenated.

    KIND decomposes W_q, W_k and W_v separately; this keeps the fused layer's output layout so the
    attention code that reshapes (B, N, 3, heads, head_dim) is unchanged.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    @staticmethod
    def split_linear(fused: nn.Linear) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """Three nn.Linear whose outputs, concatenated, equal `fused` (rows [0:C], [C:2C], [2C:3C])."""
        out3, inp = fused.weight.shape
        if out3 % 3:
            raise UserError(f"a fused qkv layer needs out_features divisible by 3, got {out3}")
        c = out3 // 3
        parts = []
        for i in range(3):
            lin = nn.Linear(inp, c, bias=fused.bias is not None).to(fused.weight.device, fused.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(fused.weight[i * c:(i + 1) * c])
                if fused.bias is not None:
                    lin.bias.copy_(fused.bias[i * c:(i + 1) * c])
            parts.append(lin)
        return tuple(parts)
