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

The sparse paths all start the same way (spec §5, "fastest single-GPU recipe"): the T*k (token, expert)
pairs are sorted by expert so every expert owns one contiguous segment of rows; then

- `"gather"`: per expert, gather its tokens' rows, two plain matmuls and a scatter-add back. A custom
  autograd.Function writes weight gradients straight into full-size buffers
  (autograd through slices would allocate one full-size zero tensor per expert). Fastest on CPU; works
  anywhere (on CUDA it is N small launches per matmul, the fallback).
- `"grouped_mm"`: the same segments fed to `torch._grouped_mm` (one launch for all experts). CUDA's kernel
  needs 16-byte aligned strides, so expert widths are zero-padded to a multiple of 16 bytes (e.g. Llama's
  172 -> 176 in bf16); padded neurons have zero in- and out-weights and contribute nothing.
- `"triton"`: ScatterMoE-style kernels that fuse the gather into the first grouped matmul and the scatter
  into the second (`kernels_triton.py`). Needs the `triton` package; on CPU only under TRITON_INTERPRET=1.

`"auto"` uses only paths that have been measured to beat dense on the device (see `choose_impl`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from .routing import Act, Routing, act_backward, act_forward, needs_grad, route

IMPLS = ("auto", "masked", "gather", "grouped_mm", "triton")
GATHER_MIN_WORK = 2 ** 21  # multiply-adds per expert matmul per thread before "auto" takes "gather" on CPU
GATHER_MIN_WIDTH_THREADED = 48  # narrower experts stay on "masked" when torch runs more than one thread


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


# ----------------------------------------------------------------------------------------------
# "gather": per-expert matmuls on contiguous segments, custom backward.


class _GatherExpertFFN(torch.autograd.Function):
    """Per expert: gather its tokens, two matmuls, scatter-add back.

    Gathering and scattering one expert at a time (instead of materialising all T*k routed rows) keeps
    every temporary a few MB, so it stays in cache and the CPU allocator reuses it; one (T*k, d) buffer costs
    page faults on every call (measured: 1.5-2x slower at k = 16).
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, w_gate, tok, counts, m, activation, keep):
        T, d = x.shape
        out = x.new_zeros(T, d)
        acts: list[Act | None] = []
        # one workspace for the gathered rows and the expert outputs, reused by every expert (~5% faster
        # than fresh tensors); pre-activations get their own buffer only when backward needs them
        cmax = max(counts, default=0)
        xbuf, ybuf = x.new_empty(cmax, d), x.new_empty(cmax, d)
        ubuf = None if keep else x.new_empty(cmax, m)
        st = 0
        for e, c in enumerate(counts):
            te, sl = tok[st:st + c], slice(e * m, (e + 1) * m)
            st += c
            if c == 0:
                acts.append(None)
                continue
            xe = torch.index_select(x, 0, te, out=xbuf[:c])
            up = torch.empty(c, m, dtype=x.dtype, device=x.device) if keep else ubuf[:c]
            if b_in is None:
                torch.mm(xe, w_in[sl].t(), out=up)
            else:
                torch.addmm(b_in[sl], xe, w_in[sl].t(), out=up)
            gate = xe @ w_gate[sl].t() if w_gate is not None else None
            act = act_forward(activation, up, gate, keep)
            # w_out[:, sl] is a strided column block: BLAS reads it in place, no copy.
            out.index_add_(0, te, torch.mm(act.a.detach(), w_out[:, sl].t(), out=ybuf[:c]))
            acts.append(act if keep else None)
        ctx.save_for_backward(x, w_in, b_in, w_out, w_gate, tok)
        ctx.acts, ctx.counts, ctx.m = acts, counts, m  # activations: k/N of what the dense FFN keeps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w_in, b_in, w_out, w_gate, tok = ctx.saved_tensors
        counts, m = ctx.counts, ctx.m
        need_x, need_win, need_b, need_wout, need_gate = ctx.needs_input_grad[:5]
        g = grad_out.contiguous()
        g_win = torch.zeros_like(w_in) if need_win else None
        g_b = torch.zeros_like(b_in) if need_b else None
        g_wout = torch.zeros_like(w_out) if need_wout else None
        g_gate = torch.zeros_like(w_gate) if need_gate else None
        g_x = torch.zeros_like(x) if need_x else None
        st = 0
        for e, c in enumerate(counts):
            te, sl = tok[st:st + c], slice(e * m, (e + 1) * m)
            st += c
            if c == 0:
                continue
            saved = ctx.acts[e]
            ge = g.index_select(0, te)
            if need_wout:
                g_wout[:, sl] = ge.t() @ saved.a.detach()
            g_up, g_g = act_backward(saved, ge @ w_out[:, sl])
            if need_win or need_gate:
                xe = x.index_select(0, te)
                if need_win:
                    g_win[sl] = g_up.t() @ xe
                if need_gate:
                    g_gate[sl] = g_g.t() @ xe
            if need_b:
                g_b[sl] = g_up.sum(0)
            if need_x:
                gxe = g_up @ w_in[sl]
                if g_g is not None:
                    gxe.addmm_(g_g, w_gate[sl])
                g_x.index_add_(0, te, gxe)
        ctx.acts = None
        return g_x, g_win, g_b, g_wout, g_gate, None, None, None, None, None


def gather_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts: int, activation: Callable,
                      w_glu_gate=None, routing: Routing | None = None) -> torch.Tensor:
    rt = routing if routing is not None else route(expert_idx, num_experts)
    counts = rt.counts.tolist()  # host sync on CUDA; the per-expert loop needs the segment sizes
    keep = needs_grad(x, w_in, b_in, w_out, w_glu_gate)
    return _GatherExpertFFN.apply(x, w_in, b_in, w_out, w_glu_gate, rt.tok, counts,
                                  w_in.shape[0] // num_experts, activation, keep)


# ----------------------------------------------------------------------------------------------
# "grouped_mm": one torch._grouped_mm per matmul, expert widths padded for alignment.


def padded_width(m: int, dtype: torch.dtype, align_bytes: int = 16) -> int:
    """Smallest width >= m whose row stride is a multiple of `align_bytes` (CUDA grouped GEMM needs 16)."""
    per = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
    return -(-m // per) * per


def grouped_mm_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts: int, activation: Callable,
                          w_glu_gate=None, routing: Routing | None = None) -> torch.Tensor:
    if not hasattr(torch, "_grouped_mm"):
        raise UserError(f"impl='grouped_mm' needs torch._grouped_mm (torch >= 2.8); this is torch "
                        f"{torch.__version__}: use impl='gather'")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"impl='grouped_mm' supports float32/bfloat16/float16, not {x.dtype}; use impl='gather'")
    rt = routing if routing is not None else route(expert_idx, num_experts)
    T, d = x.shape
    N = num_experts
    m = w_in.shape[0] // N
    mp = padded_width(m, x.dtype)
    if d != padded_width(d, x.dtype):
        raise UserError(f"impl='grouped_mm' needs the model width d={d} to be a multiple of 16 bytes; "
                        "use impl='gather' or 'triton'")
    offs = torch.cumsum(rt.counts, 0).to(torch.int32)  # end row of each expert's segment, no host sync

    def experts_in(w):  # (N*m, d) rows -> (N, d, mp): expert e's matrix for x_e @ W_e
        w = w.reshape(N, m, d)  # copies only a non-contiguous weight (e.g. GPT-2 Conv1D, transposed)
        if mp != m:
            w = F.pad(w, (0, 0, 0, mp - m))
        return w.transpose(1, 2)

    xs = x.index_select(0, rt.tok)
    up = torch._grouped_mm(xs, experts_in(w_in), offs=offs)
    if b_in is not None:
        b = b_in.reshape(N, m)
        if mp != m:
            b = F.pad(b, (0, mp - m))
        up = up + b.index_select(0, rt.sorted_expert)
    if w_glu_gate is None:
        a = activation(up)
    else:
        a = activation(torch._grouped_mm(xs, experts_in(w_glu_gate), offs=offs)) * up
    wo = w_out.reshape(d, N, m)
    if mp != m:
        wo = F.pad(wo, (0, mp - m))  # padded neurons get zero out-weights: they add nothing
    ys = torch._grouped_mm(a, wo.permute(1, 2, 0), offs=offs)  # (N, mp, d) per-expert out-weights
    # Un-sort by gathering instead of a scatter-add: deterministic on CUDA (no atomics); sum the k slots
    # in fp32 so low-precision outputs are rounded once, like the dense matmul's accumulator.
    inv = torch.empty_like(rt.order)
    inv[rt.order] = torch.arange(rt.order.numel(), device=inv.device)
    k = rt.order.numel() // T
    return ys.index_select(0, inv).view(T, k, d).sum(1, dtype=torch.float32).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Dispatch.

_BROKEN: set[tuple] = set()  # (impl, device type, dtype) that raised once in "auto"; not retried


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_impl(x: torch.Tensor, num_experts: int, k: int, d_ff: int) -> str:
    """The path "auto" takes. Measured on CPU (docs/emoe_performance.md); the CUDA rule is provisional.

    - k == N: every neuron is used, so the masked path is exactly the dense FFN; sparse paths only add work.
    - CPU: "gather" once each expert's matmul has at least 2M multiply-adds per torch thread (rows per expert
      * width * d >= 2**21 * threads), and with more than one thread only for experts at least 48 neurons wide.
      Measured at d = 384, d_ff = 1536, fp32 (docs/emoe_performance.md): at one thread gather/masked crosses
      1.0 between 1.1M and 2.2M multiply-adds for widths 24-96 (forward+backward is the later crossing); at two
      threads width-24 experts (N=64, k=16, T=4096) ran gather at 0.87x dense forward and 0.79x
      forward+backward, slower than masked, because BLAS splits one wide matmul across threads better than
      64 narrow ones. Below the threshold the ~10 ATen calls per expert cost more than the FLOPs they save.
    - CUDA (provisional, not measured by this library's bench yet): on an H200 a sort + `torch._grouped_mm` path
      ran at 1.48x dense at d=4096 but 0.44x at d=768, where the masked path ran at 0.63-0.70x. So:
      "grouped_mm" for bf16 on Hopper or newer when d >= 2048, else "masked". "gather" (N launches per
      matmul) and "triton" are never chosen automatically; `transferlab bench emoe-layer --device cuda` times
      all of them to replace this rule.
    Override with the environment variable TRANSFERLAB_EMOE_IMPL.
    """
    forced = os.environ.get("TRANSFERLAB_EMOE_IMPL")
    if forced:
        if forced not in IMPLS:
            raise UserError(f"TRANSFERLAB_EMOE_IMPL={forced!r} is not one of {IMPLS}")
        if forced != "auto":
            return forced
    if k >= num_experts:
        return "masked"
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if (x.dtype == torch.bfloat16 and cap >= (9, 0) and x.shape[1] >= 2048 and hasattr(torch, "_grouped_mm")
                and ("grouped_mm", "cuda", x.dtype) not in _BROKEN):
            return "grouped_mm"
        return "masked"
    rows_per_expert = x.shape[0] * k / num_experts
    width = d_ff // num_experts
    threads = max(1, torch.get_num_threads())
    if rows_per_expert * width * x.shape[1] < GATHER_MIN_WORK * threads:
        return "masked"
    if threads > 1 and width < GATHER_MIN_WIDTH_THREADED:
        return "masked"
    return "gather"


def _check(x, w_in, b_in, w_out, expert_idx, num_experts, w_glu_gate) -> None:
    if x.dim() != 2:
        raise UserError(f"expert_ffn needs x of shape (tokens, d); got {tuple(x.shape)}: flatten batch dims first")
    d_ff, d = w_in.shape
    if num_experts < 1 or d_ff % num_experts:
        raise UserError(f"num_experts={num_experts} must divide d_ff={d_ff}; pick a divisor of d_ff")
    if x.shape[1] != d or tuple(w_out.shape) != (d, d_ff):
        raise UserError(f"shape mismatch: x {tuple(x.shape)}, w_in {tuple(w_in.shape)} (d_ff, d), "
                        f"w_out {tuple(w_out.shape)} must be (d, d_ff)")
    if b_in is not None and tuple(b_in.shape) != (d_ff,):
        raise UserError(f"b_in must have shape ({d_ff},); got {tuple(b_in.shape)}")
    if w_glu_gate is not None and tuple(w_glu_gate.shape) != (d_ff, d):
        raise UserError(f"w_glu_gate must have shape ({d_ff}, {d}); got {tuple(w_glu_gate.shape)}")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0] or expert_idx.dtype != torch.int64:
        raise UserError(f"expert_idx must be int64 of shape (tokens={x.shape[0]}, k); got "
                        f"{expert_idx.dtype} {tuple(expert_idx.shape)}")
    if not 1 <= expert_idx.shape[1] <= num_experts:
        raise UserError(f"k={expert_idx.shape[1]} experts per token must be in 1..num_experts={num_experts}")


def expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts: int, activation: Callable, w_glu_gate=None,
               impl: str = "auto") -> torch.Tensor:
    if impl not in IMPLS:
        raise UserError(f"unknown EMoE execution path {impl!r}; use one of {', '.join(IMPLS)}")
    _check(x, w_in, b_in, w_out, expert_idx, num_experts, w_glu_gate)
    if impl == "masked" or x.shape[0] == 0:
        return masked_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate)
    auto = impl == "auto"
    if auto:
        impl = choose_impl(x, num_experts, expert_idx.shape[1], w_in.shape[0])
        if impl == "masked":
            return masked_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate)
    # The sparse paths run outside autocast (custom Functions and _grouped_mm do not cast for themselves), so
    # cast here exactly as autocast would cast F.linear's inputs; gradients flow back through the casts.
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w_in, w_out = x.to(dt), w_in.to(dt), w_out.to(dt)
        b_in = b_in.to(dt) if b_in is not None else None
        w_glu_gate = w_glu_gate.to(dt) if w_glu_gate is not None else None
    elif len({t.dtype for t in (x, w_in, b_in, w_out, w_glu_gate) if t is not None}) > 1:
        raise UserError("x and the FFN weights must share one dtype (or run under torch.autocast); got "
                        + ", ".join(str(t.dtype) for t in (x, w_in, b_in, w_out, w_glu_gate) if t is not None))
    args = (x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate)
    with torch.autocast(dev, enabled=False):
        if impl == "gather":
            return gather_expert_ffn(*args)
        if impl == "grouped_mm":
            if not auto:
                return grouped_mm_expert_ffn(*args)
            try:
                return grouped_mm_expert_ffn(*args)
            except (RuntimeError, UserError):  # e.g. a CUDA build without the bf16 grouped GEMM
                _BROKEN.add(("grouped_mm", dev, x.dtype))
                return masked_expert_ffn(*args)
        if not triton_available(x.device):
            raise UserError("impl='triton' needs the `triton` package and a CUDA device (or TRITON_INTERPRET=1 "
                            "for the CPU interpreter); install triton or use impl='gather'")
        from .kernels_triton import triton_expert_ffn

        return triton_expert_ffn(*args)
