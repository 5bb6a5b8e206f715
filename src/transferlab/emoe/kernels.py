"""Execution paths for an EMoE FFN (experts = contiguous blocks of FFN neurons).

Shared contract (used by `emoe.layer`):

    expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate=None, impl="auto")

- x: (T, d) tokens; w_in: (d_ff, d) with expert e owning rows [e*m, (e+1)*m), m = d_ff // num_experts;
- b_in: (d_ff,) or None; w_out: (d, d_ff), columns grouped like w_in's rows;
- expert_idx: (T, k) int64 selected experts per token (each token's k experts are distinct);
- activation: a callable on tensors;
- w_glu_gate: (d_ff, d) for gated FFNs (Llama): h = act(x @ w_glu_gate.T) * (x @ w_in.T);
- returns (T, d) = sum over selected experts of the expert's output (combine weight 1), without w_out's bias.

`impl="masked"` is the reference: the dense FFN with unselected experts' neurons zeroed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def expert_mask(expert_idx: torch.Tensor, num_experts: int, d_ff: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, d_ff) 0/1 mask of the neurons that belong to each token's selected experts."""
    sel = torch.zeros(expert_idx.shape[0], num_experts, dtype=dtype, device=expert_idx.device)
    sel.scatter_(1, expert_idx, 1.0)
    return sel.repeat_interleave(d_ff // num_experts, dim=1)


def masked_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts: int, activation: Callable,
                      w_glu_gate=None) -> torch.Tensor:
    h = torch.nn.functional.linear(x, w_in, b_in)
    if w_glu_gate is not None:
        h = activation(torch.nn.functional.linear(x, w_glu_gate)) * h
    else:
        h = activation(h)
    h = h * expert_mask(expert_idx, num_experts, w_in.shape[0], h.dtype)
    return torch.nn.functional.linear(h, w_out)


def expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts: int, activation: Callable, w_glu_gate=None,
               impl: str = "auto") -> torch.Tensor:
    if impl in ("masked", "auto"):
        return masked_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate)
    raise ValueError(f"unknown EMoE execution path {impl!r}; use 'auto' or 'masked'")
