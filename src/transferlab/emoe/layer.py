"""The EMoE forward pass shared by every architecture: gate scores, expert selection, expert FFN.

A converted FFN keeps its own (permuted) Parameters; `EMoEMixin` only changes how they are used.
Because convert() permuted the neurons so expert e owns the contiguous block [e*m, (e+1)*m):

- the avg-k gate G_e (mean of expert e's key rows, paper §3.2) is a reshape-mean of the live key
  matrix, recomputed under no_grad whenever the keys changed (== the official
  `update_one_score_gate()` after every optimiser step, without a training-loop hook);
- the selected experts' outputs are summed with weight exactly 1, so no gradient reaches the gate,
  and an expert no token selected gets exactly zero gradient (its neurons are masked out);
- the compute goes through `kernels.expert_ffn`, whose `impl` picks dense-masked or sparse paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import EMoEConfig
from .kernels import expert_ffn


class EMoEState:
    """Per-layer bookkeeping of a converted FFN (a plain object, so it adds no state_dict keys)."""

    def __init__(self, cfg: EMoEConfig, index: int, adapter: str, perm: torch.Tensor, original_class: type):
        self.cfg = cfg
        self.index = index
        self.adapter = adapter
        self.perm = perm  # new position j holds original neuron perm[j]
        self.original_class = original_class
        self.gate_cache: tuple | None = None
        self.aux_loss: torch.Tensor | None = None
        self.load = torch.zeros(cfg.num_experts, dtype=torch.long)  # tokens routed to each expert
        self.track_load = False


def avg_k_gate(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, d) mean of each expert's raw (unnormalised) key rows: the EMoE gate (paper eq. 3)."""
    d_ff, d = key.shape
    return key.detach().float().reshape(num_experts, d_ff // num_experts, d).mean(1)


def _version(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device)


class EMoEMixin:
    """Mixed into a copy of the FFN host's class by convert(); `emoe_state` holds the settings."""

    emoe_state: EMoEState

    def _emoe_gate(self, key: torch.Tensor) -> torch.Tensor:
        st = self.emoe_state
        v = _version(key)
        if st.gate_cache is None or st.gate_cache[0] != v:
            st.gate_cache = (v, avg_k_gate(key, st.cfg.num_experts))
        return st.gate_cache[1]

    def emoe_scores(self, x2: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(T, N) fp32 routing scores: the expert's mean pre-activation without bias (avg-k)."""
        cfg = self.emoe_state.cfg
        if cfg.gate == "learned":
            # EMoE-learn [reconstructed]: a Tutel-style cosine router with a learnable scale,
            # initialised at the avg-k centroids so training starts from EMoE's routing.
            r = F.normalize(self.emoe_router.float(), dim=1)
            scale = self.emoe_logit_scale.clamp(max=math.log(100.0)).exp()
            return F.normalize(x2.float(), dim=1) @ r.T * scale
        with torch.no_grad():
            return x2.detach().float() @ self._emoe_gate(key).T

    def emoe_ffn(self, x: torch.Tensor, w_in, b_in, w_out, activation: Callable, key: torch.Tensor,
                 w_glu_gate=None) -> torch.Tensor:
        """sum over selected experts of W_out[:, e] act(W_in[e] x + b_in[e]) (no output bias)."""
        st, cfg = self.emoe_state, self.emoe_state.cfg
        n, k = cfg.num_experts, cfg.top_k
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        scores = self.emoe_scores(x2, key)
        if self.training and cfg.gate_noise > 0:
            scores = scores + torch.randn_like(scores) * (cfg.gate_noise / n)
        ranked = scores if cfg.select == "top-k" else -scores
        idx = ranked.topk(k, dim=1).indices  # (T, k), distinct experts per token
        weights = None  # None = every selected pair has combine weight exactly 1 (paper)
        if cfg.gate == "learned":
            # softmax weights over the selected experts, times k so they start near EMoE's weight 1
            weights = torch.softmax(scores.gather(1, idx), dim=1) * k
        if cfg.capacity_factor is not None:
            keep = _capacity_keep(idx, n, cfg.capacity_factor)
            weights = keep.to(x.dtype) if weights is None else weights * keep
        if st.track_load:
            st.load += torch.bincount(idx.flatten().cpu(), minlength=n)
        if self.training and cfg.aux_loss_weight > 0:
            st.aux_loss = _tutel_balance_loss(scores, idx, n)
        act = _with_dropout(activation, cfg, self.training)
        if weights is None:
            y = expert_ffn(x2, w_in, b_in, w_out, idx, n, act, w_glu_gate=w_glu_gate, impl=cfg.impl)
        else:
            y = _weighted_masked_ffn(x2, w_in, b_in, w_out, idx, weights, n, act, w_glu_gate)
        return y.reshape(*shape[:-1], y.shape[-1])


def _with_dropout(activation: Callable, cfg: EMoEConfig, training: bool) -> Callable:
    """Official-code extra expert dropout (pre- or post-activation); identity when off or in eval."""
    p = cfg.expert_dropout
    if p == 0 or not training:
        return activation
    if cfg.expert_dropout_position == "pre":
        return lambda h: activation(F.dropout(h, p, True))
    return lambda h: F.dropout(activation(h), p, True)


def _capacity_keep(idx: torch.Tensor, n: int, cf: float) -> torch.Tensor:
    """(T, k) 0/1: Tutel's batch-prioritised capacity k*floor(cf*ceil(T/N)); later tokens overflow."""
    t, k = idx.shape
    cap = k * int(cf * math.ceil(t / n))
    onehot = F.one_hot(idx, n)  # (T, k, N)
    # position of each pair in its expert's queue, in token order (slot order within a token)
    pos = onehot.reshape(t * k, n).cumsum(0).reshape(t, k, n)
    pos = (pos * onehot).sum(-1)
    return (pos <= cap).to(torch.float32)


def _tutel_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Tutel's load + importance loss (squared coefficients of variation); gradient only via x."""
    probs = torch.softmax(scores, dim=1)
    importance = probs.sum(0)
    load = torch.zeros(n, device=scores.device).scatter_add_(0, idx.flatten(),
                                                             torch.ones(idx.numel(), device=scores.device))

    def cv2(v):
        return v.float().var() / (v.float().mean() ** 2 + 1e-10)

    return cv2(importance) + cv2(load)


def _weighted_masked_ffn(x, w_in, b_in, w_out, idx, weights, n, activation, w_glu_gate=None):
    """Masked-dense FFN with a per-(token, expert) combine weight (EMoE-learn, capacity drops)."""
    h = F.linear(x, w_in, b_in)
    h = activation(F.linear(x, w_glu_gate)) * h if w_glu_gate is not None else activation(h)
    w = torch.zeros(x.shape[0], n, dtype=h.dtype, device=h.device).scatter(1, idx, weights.to(h.dtype))
    h = h * w.repeat_interleave(w_in.shape[0] // n, dim=1)
    return F.linear(h, w_out)
