"""KindLinear, ClassGate and the qkv split: exact algebra, routing and gradient isolation."""

import pytest
import torch
from torch import nn

from transferlab.core.errors import UserError
from transferlab.kind import ClassGate, GateContext, KindLinear, SplitQKV
from transferlab.kind.gate import gate_table


def _random_layer(compute="auto", dtype=torch.float64, n_g=3, n_t=5, i=12, o=9):
    layer = KindLinear(i, o, n_g, n_t, compute=compute).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


@pytest.mark.parametrize("compute", ["factored", "dense", "auto"])
def test_all_components_active_equals_usv(compute):
    layer = _random_layer(compute)
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    U = torch.cat([layer.U_g, layer.U_t], 1)
    s = torch.cat([layer.s_g, layer.s_t])
    V = torch.cat([layer.V_g, layer.V_t], 1)
    expected = x @ (U @ torch.diag(s) @ V.T).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.dense_weight(), U @ torch.diag(s) @ V.T, atol=1e-10, rtol=0)


def test_from_linear_full_rank_reproduces_linear():
    lin = nn.Linear(6, 10).double()
    layer = KindLinear.from_linear(lin, 2, 4)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-10, rtol=0)
    # singular values come out sorted: learngenes hold the largest ones
    assert layer.s_g.min() >= layer.s_t.max()


def _with_context(layer, labels, table):
    ctx = GateContext()
    masks, inv = torch.unique(table[labels], dim=0, return_inverse=True)
    ctx.set(masks.to(layer.U_g.dtype), inv)
    layer.ctx = ctx
    return layer


@pytest.mark.parametrize("compute", ["factored", "dense"])
def test_gate_routes_only_the_class_tailors_and_others_get_zero_grad(compute):
    table = gate_table(num_classes=3, n_tailor=6, k_active=2)  # class 1 -> tailors 2, 3
    layer = _with_context(_random_layer(compute, n_t=6), torch.tensor([1, 1, 1]), table)
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    out = layer(x)
    manual = x @ layer.dense_weight(table[1].double()).T + layer.bias
    torch.testing.assert_close(out, manual, atol=1e-10, rtol=0)
    out.square().sum().backward()
    inactive = [0, 1, 4, 5]
    for p in (layer.U_t, layer.V_t):
        assert torch.equal(p.grad[:, inactive], torch.zeros_like(p.grad[:, inactive]))
        assert p.grad[:, [2, 3]].abs().sum() > 0
    assert torch.equal(layer.s_t.grad[inactive], torch.zeros(4, dtype=torch.float64))
    assert all(p.grad.abs().sum() > 0 for p in layer.learngene_parameters())
    # changing an inactive tailor does not change the output; changing an active one does
    with torch.no_grad():
        layer.U_t[:, 0] += 1.0
        torch.testing.assert_close(layer(x), out, atol=1e-10, rtol=0)
        layer.U_t[:, 2] += 1.0
        assert not torch.allclose(layer(x), out)


@pytest.mark.parametrize("compute", ["factored", "dense", "auto"])
def test_mixed_class_batch_equals_per_sample_runs(compute):
    table = gate_table(num_classes=3, n_tailor=6, k_active=2, assignment="random", seed=3)
    layer = _random_layer(compute, n_t=6)
    labels = torch.tensor([2, 0, 3, 1, 2])  # 3 = null label -> learngenes only
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    mixed = _with_context(layer, labels, table)(x)
    for b in range(len(labels)):
        single = _with_context(layer, labels[b:b + 1], table)(x[b:b + 1])
        torch.testing.assert_close(mixed[b:b + 1], single, atol=1e-10, rtol=0)
    # the null label gets exactly the learngene-only layer
    learngene_only = x[2] @ ((layer.U_g * layer.s_g) @ layer.V_g.T).T + layer.bias
    torch.testing.assert_close(mixed[2], learngene_only, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(4, 12), (4, 3, 12)])
def test_mixed_batch_gathered_tailors_match_dense_weights_and_unused_tailors_get_zero_grad(shape):
    """The mixed-class path (learngenes as one product, each sample's own tailors by batched matmuls)."""
    table = gate_table(num_classes=3, n_tailor=9, k_active=2)  # classes use tailors 0-1, 2-3, 4-5; 6-8 unused
    layer = _with_context(_random_layer("auto", n_t=9, o=14), torch.tensor([0, 2, 3, 2]), table)
    x = torch.randn(*shape, dtype=torch.float64)
    out = layer(x)
    for b, c in enumerate([0, 2, 3, 2]):
        manual = x[b] @ layer.dense_weight(table[c].double()).T + layer.bias
        torch.testing.assert_close(out[b], manual, atol=1e-10, rtol=0)
    out.square().sum().backward()
    unused = [2, 3, 6, 7, 8]  # class 1 is not in the batch; the null label (3) uses no tailor
    for p in (layer.U_t, layer.V_t):
        assert torch.equal(p.grad[:, unused], torch.zeros_like(p.grad[:, unused]))
        assert p.grad[:, [0, 1, 4, 5]].abs().min() > 0
    assert torch.equal(layer.s_t.grad[unused], torch.zeros(5, dtype=torch.float64))


def test_class_gate_is_deterministic_with_k_per_class_and_disjoint_blocks():
    block = gate_table(4, 16, 4)
    assert torch.equal(block[:4].sum(1), torch.full((4,), 4.0))
    assert torch.equal(block[:4].sum(0), torch.ones(16))  # disjoint and covering
    assert block[4].sum() == 0  # null label: learngenes only
    r1, r2 = gate_table(4, 16, 3, "random", seed=1), gate_table(4, 16, 3, "random", seed=1)
    assert torch.equal(r1, r2) and torch.equal(r1[:4].sum(1), torch.full((4,), 3.0))
    assert not torch.equal(r1, gate_table(4, 16, 3, "random", seed=2))
    assert gate_table(4, 16, 4, gate=False)[:4].min() == 1
    assert gate_table(4, 16, 4, null_class="all_tailors")[4].min() == 1


def test_class_outside_gate_is_a_clear_error():
    gate = ClassGate(num_classes=3, n_tailor=6)
    with pytest.raises(UserError, match="outside the gate"):
        gate.mask(torch.tensor([0, 4]))
    with pytest.raises(UserError, match="outside the gate"):
        gate.mask(torch.tensor([-1]))
    with pytest.raises(UserError, match="integers"):
        gate.mask(torch.tensor([0.5]))
    assert gate.mask(torch.tensor([3])).sum() == 0  # 3 is the null label, allowed


def test_too_many_components_need_explicit_permission():
    with pytest.raises(UserError, match="exceeds min"):
        KindLinear(8, 16, 5, 4)
    layer = KindLinear(8, 16, 5, 4, allow_overcomplete=True)
    assert layer(torch.randn(2, 8)).shape == (2, 16)
    with pytest.raises(UserError):
        KindLinear(8, 16, -1, 4)


def test_qkv_split_equals_fused():
    fused = nn.Linear(12, 36).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    split = SplitQKV(*SplitQKV.split_linear(fused))
    torch.testing.assert_close(split(x), fused(x), atol=1e-12, rtol=0)
    kind = SplitQKV(*(KindLinear.from_linear(p, 6, 6) for p in SplitQKV.split_linear(fused)))
    torch.testing.assert_close(kind(x), fused(x), atol=1e-10, rtol=0)
    with pytest.raises(UserError, match="divisible by 3"):
        SplitQKV.split_linear(nn.Linear(4, 10))


def test_inactive_tailors_are_skipped_in_factored_flops():
    from transferlab.nn.diffusion import flops_per_forward

    table = gate_table(num_classes=4, n_tailor=32, k_active=8)
    layer = _with_context(KindLinear(64, 64, 32, 32, compute="factored"), torch.tensor([1]), table)
    x = torch.randn(1, 16, 64)
    gated = flops_per_forward(layer, x)
    layer.ctx = None
    full = flops_per_forward(layer, x)
    assert gated == pytest.approx(full * (32 + 8) / 64, rel=0.01)


@pytest.mark.cuda
def test_kind_linear_cuda_matches_cpu():
    layer = _random_layer("auto", torch.float32)
    x = torch.randn(4, 6, 12)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x), atol=1e-4, rtol=1e-4)
