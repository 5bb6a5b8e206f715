"""The EMoE forward pass shared by every architecture: gate scores, expert selection, expert FFN.

A converted FFN keeps its own (permuted) Parameters; `EMoEMixin` only changes how they are used.
Because convert() permuted the neurons so expert e owns the contiguous block [e*m, (e+1)*m):

- the avg-k gate G_e (mean of expert e's key rows, paper §3.2) is a reshape-mean of the live key
  matrix, recomputed on every forward (== the official `update_one_score_gate()` after every optimiser
  step). It costs d_ff*d additions, a few per mille of the FFN at T >= 32 tokens, and stays correct under
  any write to the keys, including writes through `.data` that autograd's version counter never sees;
- the selected experts' outputs are summed with weight exactly 1, so no gradient reaches the gate,
  and an expert no token selected gets exactly zero gradient (its neurons are masked out);
- the compute goes through `kernels.expert_ffn`, whose `impl` picks dense-masked or sparse paths.

The official-code (Tutel) extras follow `tutel/impls/moe_layer.py` and `fast_dispatch.py`: gate noise
N(0,1)*noise/N on the training logits, batch-prioritised capacity dropping and `load_importance_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
        self.aux_loss: torch.Tensor | None = None
        self.load = torch.zeros(cfg.num_experts, dtype=torch.long)  # tokens routed to each expert
        self.track_load = False
        self.record = False  # keep the last forward's (T, k) expert ids in `last_idx` (routing analysis)
        self.last_idx: torch.Tensor | None = None


def avg_k_gate(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, d) mean of each expert's raw (unnormalised) key rows: the EMoE gate (paper eq. 3)."""
    d_ff, d = key.shape
    return key.detach().float().reshape(num_experts, d_ff // num_experts, d).mean(1)


class CosineRouter(nn.Module):
    """EMoE-learn's gate: Tutel's `CosineTopKGate` (tutel/gates/cosine_top.py).

    logits = cos(P x + b, S_e) * exp(min(t, log 100)); P: (proj_dim, d) projector, S: (proj_dim, N)
    similarity matrix drawn from N(0, 0.01^2), t initialised at log(1/0.5). Randomly initialised, so
    EMoE-learn starts from a routing unrelated to the emergent clusters (the clusters still define the
    experts). Runs in fp32 (`fp32_gate=True` in the official code).
    """

    def __init__(self, d: int, num_experts: int, proj_dim: int = 256, init_t: float = 0.5):
        super().__init__()
        self.projector = nn.Linear(d, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0, 0.01))
        self.temperature = nn.Parameter(torch.log(torch.full((1,), 1.0 / init_t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x.float(), self.projector.weight.float(), self.projector.bias.float())
        logits = F.normalize(z, dim=1) @ F.normalize(self.sim_matrix.float(), dim=0)
        return logits * self.temperature.clamp(max=math.log(100.0)).exp()


class EMoEMixin:
    """Mixed into a copy of the FFN host's class by convert(); `emoe_state` holds the settings."""

    emoe_state: EMoEState

    def emoe_scores(self, x2: torch.Tensor, key: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """(T, N) fp32 routing logits: the expert's mean pre-activation without bias (avg-k).

        grad=True keeps the path from x2 to the logits (the gate itself stays frozen); the balance
        loss needs it. The learned router always has its own gradient.
        """
        cfg = self.emoe_state.cfg
        if cfg.gate == "learned":
            return self.emoe_router(x2)
        gate = avg_k_gate(key, cfg.num_experts)
        if grad:
            return x2.float() @ gate.T
        with torch.no_grad():
            return x2.detach().float() @ gate.T

    def emoe_ffn(self, x: torch.Tensor, w_in, b_in, w_out, activation: Callable, key: torch.Tensor,
                 w_glu_gate=None) -> torch.Tensor:
        """sum over selected experts of W_out[:, e] act(W_in[e] x + b_in[e]) (no output bias)."""
        st, cfg = self.emoe_state, self.emoe_state.cfg
        n, k = cfg.num_experts, cfg.top_k
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        want_aux = self.training and cfg.aux_loss_weight > 0
        logits = self.emoe_scores(x2, key, grad=want_aux)
        noisy = logits
        if self.training and cfg.gate_noise > 0:
            noisy = logits + torch.randn_like(logits) * (cfg.gate_noise / n)
        ranked = noisy if cfg.select == "top-k" else -noisy
        idx = ranked.detach().topk(k, dim=1).indices  # (T, k), distinct experts per token, best first
        weights = None  # None = every selected pair has combine weight exactly 1 (paper)
        if cfg.gate == "learned":
            # Tutel with normalize_gate=True: softmax over all experts, top-k values renormalised to sum 1
            top = torch.softmax(noisy, dim=1).gather(1, idx)
            weights = top / top.sum(1, keepdim=True).clamp_min(torch.finfo(top.dtype).eps)
        if cfg.capacity_factor is not None:
            priority = torch.softmax(ranked.detach(), dim=1).amax(1)
            keep = capacity_keep(idx, priority, n, cfg.capacity_factor)
            weights = keep.to(x.dtype) if weights is None else weights * keep
        if st.track_load:
            st.load += torch.bincount(idx.flatten().cpu(), minlength=n)
        if st.record:
            st.last_idx = idx.cpu()
        st.aux_loss = load_importance_loss(logits, noisy, idx, n, cfg.gate_noise) if want_aux else None
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


def capacity_keep(idx: torch.Tensor, priority: torch.Tensor, n: int, cf: float) -> torch.Tensor:
    """(T, k) 0/1 mask of the (token, slot) pairs that fit Tutel's batch-prioritised capacity.

    Capacity per expert is k*floor(cf*ceil(T/N)). Each expert fills its queue with every token's first
    choice before any second choice (then third, ...); within one choice rank, tokens with a higher
    `priority` (Tutel: their largest softmax score) come first, ties in token order. Pairs past the
    capacity are dropped.
    """
    t, k = idx.shape
    cap = k * int(cf * math.ceil(t / n))
    order = torch.sort(priority, descending=True, stable=True).indices  # tokens, best first
    queue = idx.index_select(0, order).T.reshape(-1)  # slot-major: all first choices, then seconds, ...
    sorted_e, pos_in_queue = torch.sort(queue, stable=True)
    counts = torch.bincount(queue, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(queue)
    rank[pos_in_queue] = torch.arange(queue.numel(), device=idx.device) - starts[sorted_e]
    keep_sorted = (rank < cap).reshape(k, t).T  # (T, k) rows in priority order
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep.to(torch.float32)


def _cv2(v: torch.Tensor) -> torch.Tensor:
    return v.var() / (v.mean() ** 2 + 1e-10)


def load_importance_loss(logits: torch.Tensor, noisy: torch.Tensor, idx: torch.Tensor, n: int,
                         gate_noise: float) -> torch.Tensor:
    """Tutel's `load_importance_loss` (tutel/impls/losses.py), is_gshard_loss=False.

    importance = column sums of softmax(clean logits); load = column sums of the smooth probability
    Phi((p_clean - threshold) / (noise/N)) that an expert stays selected, threshold = the k-th selected
    noisy logit (Tutel compares the softmax *probabilities* against that noisy *logit*; kept as written).
    Loss = (CV^2(importance) + CV^2(load)) / 2. With the avg-k gate frozen, its gradient flows only into
    the layer's input hidden states (the layers below); with the learned router also into the router.
    """
    probs = torch.softmax(logits.float(), dim=1)
    threshold = noisy.float().gather(1, idx[:, -1:])
    sigma = gate_noise / n
    load = (0.5 * (1 + torch.special.erf((probs - threshold) / (sigma * math.sqrt(2))))).sum(0)
    return (_cv2(probs.sum(0)) + _cv2(load)) / 2


def _weighted_masked_ffn(x, w_in, b_in, w_out, idx, weights, n, activation, w_glu_gate=None):
    """Masked-dense FFN with a per-(token, expert) combine weight (EMoE-learn, capacity drops)."""
    h = F.linear(x, w_in, b_in)
    h = activation(F.linear(x, w_glu_gate)) * h if w_glu_gate is not None else activation(h)
    w = torch.zeros(x.shape[0], n, dtype=h.dtype, device=h.device).scatter(1, idx, weights.to(h.dtype))
    h = h * w.repeat_interleave(w_in.shape[0] // n, dim=1)
    return F.linear(h, w_out)
