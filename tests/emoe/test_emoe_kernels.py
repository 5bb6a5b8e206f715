"""Every sparse EMoE execution path equals the masked reference, forward and backward (spec §7.4)."""

import os

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.errors import UserError
from transferlab.emoe import kernels
from transferlab.emoe.kernels import expert_ffn, padded_width, route

CPU_IMPLS = ["gather", "grouped_mm"]
TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


def make(T, d, d_ff, N, k, *, bias=True, glu=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    x = r(T, d)
    w_in, w_out = r(d_ff, d, scale=d ** -0.5), r(d, d_ff, scale=d_ff ** -0.5)
    b_in = r(d_ff, scale=0.1) if bias else None
    w_gate = r(d_ff, d, scale=d ** -0.5) if glu else None
    # distinct experts per token, like top-k; some experts may get no token at all
    idx = torch.rand(T, N, generator=g).argsort(1)[:, :k].to(device)
    return x, w_in, b_in, w_out, idx, w_gate


def run(impl, x, w_in, b_in, w_out, idx, w_gate, N, act, grad):
    leaves = [t for t in (x, w_in, b_in, w_out, w_gate) if t is not None]
    for t in leaves:
        t.grad = None
    y = expert_ffn(x, w_in, b_in, w_out, idx, N, act, w_glu_gate=w_gate, impl=impl)
    y.backward(grad)
    return y.detach().clone(), [t.grad.clone() for t in leaves]


def assert_same(impl, T, d, d_ff, N, k, *, bias=True, glu=False, dtype=torch.float32, act=F.gelu, device="cpu"):
    x, w_in, b_in, w_out, idx, w_gate = make(T, d, d_ff, N, k, bias=bias, glu=glu, dtype=dtype, device=device)
    grad = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    y_ref, g_ref = run("masked", x, w_in, b_in, w_out, idx, w_gate, N, act, grad)
    y, gs = run(impl, x, w_in, b_in, w_out, idx, w_gate, N, act, grad)
    assert y.dtype == y_ref.dtype and y.shape == (T, d)
    atol, rtol = TOL[dtype]
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, atol=atol * max(1.0, scale), rtol=rtol)
    names = ["x", "w_in", "b_in", "w_out", "w_glu_gate"]
    names = [n for n, t in zip(names, (x, w_in, b_in, w_out, w_gate)) if t is not None]
    for n, a, b in zip(names, gs, g_ref):
        s = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol * s, rtol=rtol, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("bias,glu", [(True, False), (False, False), (False, True), (True, True)])
def test_sparse_equals_masked_fp32(impl, bias, glu):
    act = F.silu if glu else F.gelu
    assert_same(impl, T=50, d=32, d_ff=128, N=8, k=2, bias=bias, glu=glu, act=act)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("N,k", [(4, 1), (4, 4), (16, 3)])
def test_sparse_equals_masked_odd_width_and_k_extremes(impl, N, k):
    # expert width 172 (Llama-2-7B's 11008/64): not a multiple of 8 or 16, so grouped_mm must pad
    assert_same(impl, T=24, d=16, d_ff=172 * N, N=N, k=k, glu=True, act=F.silu)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_sparse_equals_masked_bf16(impl):
    # bf16 rows of width 172 are 344 bytes: misaligned for the grouped GEMM without padding
    assert_same(impl, T=40, d=32, d_ff=172 * 4, N=4, k=2, dtype=torch.bfloat16, act=F.gelu)


def test_gather_float64_tight_and_nonsmooth_activation():
    # float64 isolates the algorithm from rounding; relu checks the recomputed activation backward
    assert_same("gather", T=30, d=8, d_ff=48, N=6, k=3, dtype=torch.float64, act=F.relu)


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


INTERPRET = _has_triton() and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("impl,dtype", [("gather", torch.float64), ("grouped_mm", torch.float32),
                                        pytest.param("triton", torch.float32, marks=pytest.mark.skipif(
                                            not INTERPRET, reason="needs triton + TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("glu", [False, True])
def test_stochastic_activation_backward_replays_forward(glu, impl, dtype):
    # The EMoE layer passes activations with expert dropout. y is linear in w_out (y = A @ w_out.T), so
    # <g, y> == <grad w_out, w_out> exactly when backward uses the forward's dropout mask, not a new one;
    # and grad x must match a finite difference taken with the same masks.
    x, w_in, b_in, w_out, idx, w_gate = make(64, 16, 96, 6, 2, glu=glu, dtype=dtype)

    def act(h):
        return F.dropout(F.gelu(h), 0.5, True)

    g = torch.randn(64, 16, dtype=dtype)
    torch.manual_seed(3)
    y = expert_ffn(x, w_in, b_in, w_out, idx, 6, act, w_glu_gate=w_gate, impl=impl)
    y.backward(g)
    torch.testing.assert_close((g * y).sum(), (w_out.grad * w_out).sum(), rtol=1e-5, atol=1e-4)
    if dtype != torch.float64:
        return
    # same seed => same masks: a small step along grad x changes <g, y> by <grad x, dx>
    dx = 1e-6 * torch.randn_like(x)
    torch.manual_seed(3)
    y2 = expert_ffn(x.detach() + dx, w_in, b_in, w_out, idx, 6, act, w_glu_gate=w_gate, impl=impl)
    torch.testing.assert_close((g * (y2 - y)).sum(), (x.grad * dx).sum(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("impl", CPU_IMPLS + [pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="needs triton + TRITON_INTERPRET=1"))])
def test_non_contiguous_weights(impl):
    # GPT-2's Conv1D stores (d, d_ff): adapters pass transposed views, which every path must accept
    x, w_in, b_in, w_out, idx, w_gate = make(40, 16, 64, 4, 2, glu=True)
    g = torch.randn(40, 16)
    leaves = (x, w_in, b_in, w_out, w_gate)
    y_ref, g_ref = run("masked", *leaves[:4], idx, w_gate, 4, F.silu, g)
    tw = [t.detach().t().contiguous().requires_grad_(True) for t in (w_in, w_out, w_gate)]
    for t in (x, b_in):
        t.grad = None
    y = expert_ffn(x, tw[0].t(), b_in, tw[1].t(), idx, 4, F.silu, w_glu_gate=tw[2].t(), impl=impl)
    y.backward(g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for got, want in zip([x.grad, tw[0].grad.t(), b_in.grad, tw[1].grad.t(), tw[2].grad.t()], g_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_inplace_activation():
    assert_same("gather", T=40, d=8, d_ff=32, N=4, k=2, act=torch.nn.ReLU(inplace=True), dtype=torch.float64)


def test_no_grad_forward_keeps_no_graph():
    x, w_in, b_in, w_out, idx, _ = make(40, 8, 32, 4, 2)
    with torch.no_grad():
        y = expert_ffn(x, w_in, b_in, w_out, idx, 4, F.gelu, impl="gather")
    assert not y.requires_grad


def test_unused_experts_get_zero_grad_and_frozen_weights_get_none():
    x, w_in, b_in, w_out, idx, _ = make(20, 8, 64, 8, 2)
    idx = torch.randint(0, 2, (20, 1)).repeat(1, 2)
    idx[:, 1] = 5  # experts {0,1,5} only
    w_out.requires_grad_(False)
    y = expert_ffn(x, w_in, b_in, w_out, idx, 8, F.gelu, impl="gather")
    y.sum().backward()
    assert w_out.grad is None
    rows_used = torch.zeros(64, dtype=torch.bool)
    for e in (0, 1, 5):
        rows_used[e * 8:(e + 1) * 8] = True
    assert w_in.grad[~rows_used].abs().max() == 0 and w_in.grad[rows_used].abs().max() > 0
    assert b_in.grad[~rows_used].abs().max() == 0


def test_route_segments_are_contiguous_and_complete():
    idx = torch.tensor([[2, 0], [1, 2], [2, 3]])
    rt = route(idx, 5)
    assert rt.counts.tolist() == [1, 1, 3, 1, 0]
    assert rt.sorted_expert.tolist() == [0, 1, 2, 2, 2, 3]
    assert rt.tok.tolist() == [0, 1, 0, 1, 2, 2]  # stable: tokens in order inside a segment
    assert torch.equal(idx.reshape(-1)[rt.order], rt.sorted_expert)


def test_padded_width():
    assert padded_width(172, torch.bfloat16) == 176
    assert padded_width(176, torch.bfloat16) == 176
    assert padded_width(172, torch.float32) == 172
    assert padded_width(1, torch.float32) == 4


def test_auto_matches_masked_and_picks_sparse_on_cpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    x = torch.randn(4096, 384)
    assert kernels.choose_impl(x, 16, 4, 1536) == "gather"
    assert kernels.choose_impl(x, 16, 16, 1536) == "masked"  # k = N: masked is exactly dense
    assert kernels.choose_impl(x[:8], 16, 4, 1536) == "masked"  # tiny batch: per-expert overhead dominates
    assert_same("auto", T=2400, d=64, d_ff=512, N=8, k=2)
    assert kernels.choose_impl(torch.randn(2400, 64), 8, 2, 512) == "gather"  # so the line above ran sparse


def test_auto_follows_the_measured_cpu_crossover(monkeypatch):
    """N=64, k=16 at d=384: gather lost to masked below ~2M multiply-adds per expert (T=512: 1.1M) at one
    thread, and at width 24 with two threads at any T."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert kernels.choose_impl(torch.randn(512, 384), 64, 16, 1536) == "masked"
    assert kernels.choose_impl(torch.randn(4096, 384), 64, 16, 1536) == "gather"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert kernels.choose_impl(torch.randn(4096, 384), 64, 16, 1536) == "masked"
    assert kernels.choose_impl(torch.randn(4096, 384), 16, 4, 1536) == "gather"  # width 96 still wins


def test_autocast_bf16_casts_like_linear():
    x, w_in, b_in, w_out, idx, _ = make(32, 16, 64, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_ffn(x, w_in, b_in, w_out, idx, 4, F.gelu, impl="gather")
        y_ref = expert_ffn(x, w_in, b_in, w_out, idx, 4, F.gelu, impl="masked")
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert w_in.grad is not None and w_in.grad.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(impl="fast"), "unknown EMoE execution path"),
    (dict(num_experts=5), "must divide d_ff"),
    (dict(expert_idx=torch.zeros(7, 2, dtype=torch.int32)), "int64"),
    (dict(expert_idx=torch.zeros(7, 9, dtype=torch.int64)), "experts per token"),
    (dict(x=torch.randn(7, 3)), "shape mismatch"),
    (dict(w_glu_gate=torch.randn(3, 3)), "w_glu_gate"),
])
def test_bad_input_raises_user_error(bad, match):
    kw = dict(x=torch.randn(7, 4), w_in=torch.randn(8, 4), b_in=None, w_out=torch.randn(4, 8),
              expert_idx=torch.zeros(7, 2, dtype=torch.int64), num_experts=4, activation=F.gelu)
    kw.update(bad)
    with pytest.raises(UserError, match=match):
        expert_ffn(**kw)


def test_mixed_dtypes_raise():
    with pytest.raises(UserError, match="share one dtype"):
        expert_ffn(torch.randn(4, 4), torch.randn(8, 4).double(), None, torch.randn(4, 8), torch.zeros(4, 1).long(),
                   4, F.gelu, impl="gather")


@pytest.mark.skipif(not INTERPRET, reason="needs `triton` and TRITON_INTERPRET=1 (Triton's CPU interpreter)")
@pytest.mark.parametrize("bias,glu,d_ff,N,k,dtype", [
    (True, False, 64, 4, 2, torch.float32),
    (False, True, 172 * 2, 2, 1, torch.float32),  # odd width, k=1
    (True, True, 16 * 12, 16, 3, torch.float32),  # many experts, some empty
    (True, False, 4 * 30, 4, 4, torch.float32),  # k=N
    (True, True, 4 * 20, 4, 2, torch.float16),  # (the 3.x interpreter computes bf16 dots wrongly: fp16 here)
])
def test_triton_interpreter_equals_masked(bias, glu, d_ff, N, k, dtype):
    assert_same("triton", T=37, d=24, d_ff=d_ff, N=N, k=k, bias=bias, glu=glu, dtype=dtype,
                act=F.silu if glu else F.gelu)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["gather", "grouped_mm", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("glu", [False, True])
def test_cuda_sparse_equals_masked(impl, dtype, glu):
    if impl == "triton" and not _has_triton():
        pytest.skip("triton not installed")
    tol_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    if impl == "grouped_mm" and dtype != torch.bfloat16:
        pytest.skip("torch._grouped_mm on CUDA is bf16-only in the torch versions we target")
    x, w_in, b_in, w_out, idx, w_gate = make(512, 64, 172 * 8, 8, 2, glu=glu, dtype=dtype, device="cuda")
    grad = torch.randn(512, 64, device="cuda", dtype=dtype)
    act = F.silu if glu else F.gelu
    y_ref, g_ref = run("masked", x, w_in, b_in, w_out, idx, w_gate, 8, act, grad)
    y, gs = run(impl, x, w_in, b_in, w_out, idx, w_gate, 8, act, grad)
    atol, rtol = TOL[tol_dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * max(1, y_ref.abs().max().item()), rtol=rtol)
    for a, b in zip(gs, g_ref):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1, b.abs().max().item()), rtol=rtol)


def test_bench_adapters_match_hf_modules():
    # the benchmark's BERT / Llama FFN adapters (also run on the GPU machine) compute what the HF modules do
    transformers = pytest.importorskip("transformers")
    from transferlab.emoe.bench_layer import _emoe_feed_forward, _emoe_glu_forward

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0)).eval()
    layer = bert.encoder.layer[0]
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(_emoe_feed_forward(layer, 4, 4, "gather")(h), layer.feed_forward_chunk(h),
                               atol=1e-5, rtol=1e-5)
    llama = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=88, num_hidden_layers=1,
                                     num_attention_heads=2)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(llama)
    torch.testing.assert_close(_emoe_glu_forward(mlp, 4, 4, "gather")(h), mlp(h), atol=1e-5, rtol=1e-5)
    y = _emoe_glu_forward(mlp, 4, 1, "gather")(h)  # k < N: sparse, must differ from dense
    assert y.shape == h.shape and not torch.allclose(y, mlp(h), atol=1e-3)


def test_env_override_of_auto(monkeypatch):
    x = torch.randn(4096, 384)
    monkeypatch.setenv("TRANSFERLAB_EMOE_IMPL", "masked")
    assert kernels.choose_impl(x, 16, 4, 1536) == "masked"
    monkeypatch.setenv("TRANSFERLAB_EMOE_IMPL", "fastest")
    with pytest.raises(UserError, match="TRANSFERLAB_EMOE_IMPL"):
        kernels.choose_impl(x, 16, 4, 1536)
