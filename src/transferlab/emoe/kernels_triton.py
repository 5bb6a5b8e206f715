"""Triton path for the EMoE FFN: ScatterMoE-style grouped matmuls with the gather/scatter fused in.

(ScatterMoE, arXiv 2403.08245: "pad indices, not tensors".) The (token, expert) pairs are sorted by expert
(`kernels.route`); the sorted rows are cut into blocks of BLOCK_M rows that never cross an expert boundary, and
one program computes one (row block, column block) tile of `A[rows] @ W_e`:

- forward 1: up = x[tok] @ W_in_e.T (+ b_e)          -- the gather of x happens inside the kernel's loads;
- forward 2: y[order] = act(up) @ W_out_e.T           -- rows are stored at their (token, slot) position, so
  the scatter is the kernel's store and the k slots are summed by a reshape, without atomics;
- backward: the same kernel gives grad wrt the activations and wrt x; a second kernel forms the weight
  gradients L_e.T @ R_e per expert, reading rows through the same index arrays.

No tensor is padded, so expert widths need no alignment (172 works). The activation (any callable) runs
in PyTorch between the two matmuls. Imported lazily: only `impl="triton"` needs the `triton` package.
Block sizes are fixed, not autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import act_backward, act_forward, needs_grad, route

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _gather_mm_kernel(A, W, Bias, Out, a_idx, out_idx, blk_start, blk_end,
                      K, NOUT,
                      s_am, s_ak, s_we, s_wk, s_wn, s_be, s_bn, s_om, s_on,
                      HAS_A_IDX: tl.constexpr, HAS_OUT_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Out[out_idx[r]] = A[a_idx[r]] @ W[e] (+ Bias[e]) for the rows r of one expert-pure block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_start + 2 * pid_m + 1)  # (start, expert) pairs
    start = tl.load(blk_start + 2 * pid_m)
    end = tl.load(blk_end + pid_m)  # start == end marks an unused block: every load and store is masked
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    if HAS_A_IDX:
        a_rows = tl.load(a_idx + rows, mask=rmask, other=0)
    else:
        a_rows = rows
    a_rows = a_rows.to(tl.int64)  # row * stride can pass 2**31 at T*k*d scale
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < NOUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(A + a_rows[:, None] * s_am + ks[None, :] * s_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + e * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full precision, like torch's default (TF32 off) matmul
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(Bias + e * s_be + cols * s_bn, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT_IDX:
        o_rows = tl.load(out_idx + rows, mask=rmask, other=0)
    else:
        o_rows = rows
    o_rows = o_rows.to(tl.int64)
    tl.store(Out + o_rows[:, None] * s_om + cols[None, :] * s_on, acc.to(Out.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(L, R, Out, l_idx, r_idx, seg_start,
                          P, Q,
                          s_lm, s_lp, s_rm, s_rq, s_oe, s_op, s_oq,
                          HAS_L_IDX: tl.constexpr, HAS_R_IDX: tl.constexpr, IEEE: tl.constexpr,
                          BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr):
    """Out[e] = L[l_idx[seg e]].T @ R[r_idx[seg e]]: (P, Q) per expert, zero for an expert with no rows."""
    e = tl.program_id(0)
    ps = tl.program_id(1) * BP + tl.arange(0, BP)
    qs = tl.program_id(2) * BQ + tl.arange(0, BQ)
    pmask = ps < P
    qmask = qs < Q
    s = tl.load(seg_start + e)
    t = tl.load(seg_start + e + 1)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for r0 in range(s, t, BR):
        rs = r0 + tl.arange(0, BR)
        rmask = rs < t
        if HAS_L_IDX:
            lr = tl.load(l_idx + rs, mask=rmask, other=0)
        else:
            lr = rs
        if HAS_R_IDX:
            rr = tl.load(r_idx + rs, mask=rmask, other=0)
        else:
            rr = rs
        lr = lr.to(tl.int64)
        rr = rr.to(tl.int64)
        lt = tl.load(L + lr[None, :] * s_lm + ps[:, None] * s_lp, mask=pmask[:, None] & rmask[None, :], other=0.0)
        rt = tl.load(R + rr[:, None] * s_rm + qs[None, :] * s_rq, mask=rmask[:, None] & qmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(lt, rt, input_precision="ieee")
        else:
            acc += tl.dot(lt, rt)
    tl.store(Out + e * s_oe + ps[:, None] * s_op + qs[None, :] * s_oq, acc.to(Out.dtype.element_ty),
             mask=pmask[:, None] & qmask[None, :])


class _Blocks:
    """Expert-pure row blocks, built on the device without a host sync (the block count is bounded by
    ceil(R / BLOCK_M) + N; spare blocks get start == end and do nothing)."""

    def __init__(self, counts: torch.Tensor, num_rows: int):
        N = counts.numel()
        dev = counts.device
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        nblk = (counts + BLOCK_M - 1) // BLOCK_M
        cum = torch.cumsum(nblk, 0)
        self.n = -(-num_rows // BLOCK_M) + N
        b = torch.arange(self.n, device=dev)
        e = torch.searchsorted(cum, b, right=True).clamp_(max=N - 1)
        j = b - (cum[e] - nblk[e])
        valid = b < cum[-1]
        start = torch.where(valid, starts[e] + j * BLOCK_M, torch.zeros_like(b))
        end = torch.where(valid, torch.minimum(start + BLOCK_M, ends[e]), start)
        self.start = torch.stack([start, e], 1).to(torch.int32).contiguous()  # (start, expert) pairs
        self.end = end.to(torch.int32).contiguous()
        self.seg = torch.cat([starts, ends[-1:]]).to(torch.int32).contiguous()  # N + 1 segment boundaries


def _expert_view(w: torch.Tensor, m: int, rows_are_neurons: bool, contract: str):
    """Strides (per expert, k, n) of expert e's matrix inside a full FFN weight, read in place (no copy).

    rows_are_neurons: w is (d_ff, d) (w_in, gate) or else (d, d_ff) (w_out). `contract` names the summed
    dimension k: "model" (x @ W_e.T for w_in; g @ W_out_e) or "neuron" (h @ W_out_e.T; g_h @ W_in_e).
    """
    s0, s1 = w.stride()
    s_e, s_neuron, s_model = (m * s0, s0, s1) if rows_are_neurons else (m * s1, s1, s0)
    return (s_e, s_model, s_neuron) if contract == "model" else (s_e, s_neuron, s_model)


def _gather_mm(a, a_idx, w, w_strides, bias, out, out_idx, blocks: _Blocks, K: int, NOUT: int):
    grid = (blocks.n, triton.cdiv(NOUT, BLOCK_N))
    dummy = blocks.end
    b = bias if bias is not None else dummy
    s_be, s_bn = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    _gather_mm_kernel[grid](
        a, w, b, out, a_idx if a_idx is not None else dummy, out_idx if out_idx is not None else dummy,
        blocks.start, blocks.end, K, NOUT,
        a.stride(0), a.stride(1), *w_strides, s_be, s_bn, out.stride(0), out.stride(1),
        HAS_A_IDX=a_idx is not None, HAS_OUT_IDX=out_idx is not None, HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out


def _wgrad(lhs, l_idx, rhs, r_idx, out, out_strides, blocks: _Blocks, N: int, P: int, Q: int):
    grid = (N, triton.cdiv(P, BLOCK_N), triton.cdiv(Q, BLOCK_N))
    dummy = blocks.end
    _grouped_wgrad_kernel[grid](
        lhs, rhs, out, l_idx if l_idx is not None else dummy, r_idx if r_idx is not None else dummy, blocks.seg,
        P, Q, lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), *out_strides,
        HAS_L_IDX=l_idx is not None, HAS_R_IDX=r_idx is not None, IEEE=lhs.dtype == torch.float32,
        BP=BLOCK_N, BQ=BLOCK_N, BR=BLOCK_K)
    return out


def _out_strides(g: torch.Tensor, m: int, rows_are_neurons: bool, neuron_first: bool):
    """(per expert, p, q) strides of a full weight-gradient buffer seen as N blocks."""
    s0, s1 = g.stride()
    if rows_are_neurons:
        s_e, s_neuron, s_model = m * s0, s0, s1
    else:
        s_e, s_neuron, s_model = m * s1, s1, s0
    return (s_e, s_neuron, s_model) if neuron_first else (s_e, s_model, s_neuron)


class _TritonExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, w_gate, expert_idx, N, activation, keep):
        T, d = x.shape
        k = expert_idx.shape[1]
        m = w_in.shape[0] // N
        rt = route(expert_idx, N)
        blocks = _Blocks(rt.counts, rt.tok.numel())
        R = rt.tok.numel()
        bias = b_in.reshape(N, m) if b_in is not None else None
        up = _gather_mm(x, rt.tok, w_in, _expert_view(w_in, m, True, "model"), bias, x.new_empty(R, m), None,
                        blocks, d, m)
        gate = None
        if w_gate is not None:
            gate = _gather_mm(x, rt.tok, w_gate, _expert_view(w_gate, m, True, "model"), None, x.new_empty(R, m),
                              None, blocks, d, m)
        act = act_forward(activation, up, gate, keep)  # graph kept: stochastic activations replay exactly
        a = act.a.detach()
        y = _gather_mm(a, None, w_out, _expert_view(w_out, m, False, "neuron"), None, x.new_empty(R, d), rt.order,
                       blocks, m, d)
        ctx.save_for_backward(x, w_in, b_in, w_out, w_gate, rt.tok, rt.order, rt.sorted_expert)
        ctx.act, ctx.blocks, ctx.N, ctx.k = act, blocks, N, k
        return y.view(T, k, d).sum(1, dtype=torch.float32).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w_in, b_in, w_out, w_gate, tok, order, sorted_expert = ctx.saved_tensors
        blocks, N, k, act = ctx.blocks, ctx.N, ctx.k, ctx.act
        need_x, need_win, need_b, need_wout, need_gate = ctx.needs_input_grad[:5]
        T, d = x.shape
        m = w_in.shape[0] // N
        R = tok.numel()
        g = g.contiguous()
        # grad wrt the activations: g[tok] @ W_out_e, read through the token index (fused gather)
        ga = _gather_mm(g, tok, w_out, _expert_view(w_out, m, False, "model"), None, g.new_empty(R, m), None,
                        blocks, d, m)
        a = act.a.detach()
        g_up, g_g = act_backward(act, ga)
        ctx.act = None
        g_x = g_win = g_b = g_wout = g_gate = None
        if need_wout:
            g_wout = torch.empty_like(w_out)
            _wgrad(g, tok, a, None, g_wout, _out_strides(g_wout, m, False, False), blocks, N, d, m)
        if need_win:
            g_win = torch.empty_like(w_in)
            _wgrad(g_up, None, x, tok, g_win, _out_strides(g_win, m, True, True), blocks, N, m, d)
        if need_gate:
            g_gate = torch.empty_like(w_gate)
            _wgrad(g_g, None, x, tok, g_gate, _out_strides(g_gate, m, True, True), blocks, N, m, d)
        if need_b:
            g_b = torch.zeros(N, m, device=x.device, dtype=torch.float32)
            g_b = g_b.index_add_(0, sorted_expert, g_up.float()).view(-1).to(b_in.dtype)
        if need_x:
            # rows stored at their (token, slot) position (fused scatter), then the k slots are summed
            gx = _gather_mm(g_up, None, w_in, _expert_view(w_in, m, True, "neuron"), None, x.new_empty(R, d), order,
                            blocks, m, d).view(T, k, d).sum(1, dtype=torch.float32)
            if g_g is not None:
                gx += _gather_mm(g_g, None, w_gate, _expert_view(w_gate, m, True, "neuron"), None, x.new_empty(R, d),
                                 order, blocks, m, d).view(T, k, d).sum(1, dtype=torch.float32)
            g_x = gx.to(x.dtype)
        return g_x, g_win, g_b, g_wout, g_gate, None, None, None, None


def triton_expert_ffn(x, w_in, b_in, w_out, expert_idx, num_experts, activation, w_glu_gate=None):
    keep = needs_grad(x, w_in, b_in, w_out, w_glu_gate)
    return _TritonExpertFFN.apply(x, w_in, b_in, w_out, w_glu_gate, expert_idx, num_experts, activation, keep)
