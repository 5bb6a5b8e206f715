"""Pieces shared by the sparse EMoE execution paths (`kernels`, `kernels_triton`): sorting (token, expert)
pairs by expert, and an activation whose backward replays the recorded forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


def needs_grad(*ts) -> bool:
    """Whether autograd will need gradients through any of these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class Routing(NamedTuple):
    """The T*k (token, slot) pairs sorted by expert (stable, so tokens stay in order inside a segment).

    order[r]: flat position t*k + j of sorted row r; tok[r] = order[r] // k: the token it reads;
    sorted_expert[r]: its expert; counts[e]: rows of expert e (segments are contiguous, in expert order).
    """

    order: torch.Tensor
    tok: torch.Tensor
    sorted_expert: torch.Tensor
    counts: torch.Tensor


def route(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    flat = expert_idx.reshape(-1)
    sorted_expert, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return Routing(order, order // expert_idx.shape[1], sorted_expert, counts)


class Act(NamedTuple):
    """An expert's activations a = act(up) (or act(gate) * up) and, when gradients are needed, the leaves
    of the small autograd graph that produced them."""

    a: torch.Tensor
    up: torch.Tensor | None
    gate: torch.Tensor | None


def act_forward(activation: Callable, up: torch.Tensor, gate: torch.Tensor | None, keep: bool) -> Act:
    """Apply the activation; with keep=True record its graph so backward replays *this* forward.

    Recomputing the activation in backward would be cheaper, but the EMoE layer passes stochastic
    activations (the official expert dropout): a recomputation draws a new mask and the gradient would
    belong to a different function.
    """
    if not keep:
        return Act(activation(up) if gate is None else activation(gate) * up, None, None)
    with torch.enable_grad():
        pu = up.detach().requires_grad_(True)
        pg = gate.detach().requires_grad_(True) if gate is not None else None
        pre = pu if pg is None else pg
        try:
            h = activation(pre)
        except RuntimeError:  # an in-place activation (ReLU(inplace=True)) refuses a leaf: give it a copy
            h = activation(pre.clone())
        a = h if pg is None else h * pu
    return Act(a, pu, pg)


def act_backward(saved: Act, grad_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad wrt up, grad wrt gate or None) from the recorded activation graph."""
    leaves = [saved.up] if saved.gate is None else [saved.up, saved.gate]
    grads = torch.autograd.grad(saved.a, leaves, grad_a)
    return grads[0], (grads[1] if saved.gate is not None else None)
