"""Aggregator invariances, masking, the inner step, the second-order meta-gradient and purity of adapt."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.errors import UserError
from transferlab.metadmoe import Aggregator, MetaDMoE
from transferlab.metadmoe.model import call_with

from .helpers import batch, make, same_state, state


def test_aggregator_is_invariant_to_expert_order_and_count():
    agg = Aggregator(8, heads=2, zero_init=False).double().eval()
    tokens = torch.randn(5, 4, 8, dtype=torch.float64)
    out = agg.features(tokens)
    for perm in ([3, 1, 0, 2], [1, 2, 3, 0]):
        torch.testing.assert_close(agg.features(tokens[:, perm]), out, atol=1e-12, rtol=0)
    assert agg.features(tokens[:, :3]).shape == (5, 8)  # N-1 tokens run too
    assert not torch.allclose(agg.features(tokens[:, :3]), out)


def test_padding_mask_equals_running_on_the_subset():
    agg = Aggregator(8, heads=2, zero_init=False).double().eval()
    tokens = torch.randn(3, 4, 8, dtype=torch.float64)
    pad = torch.tensor([False, True, False, False]).expand(3, 4)
    torch.testing.assert_close(agg.features(tokens, pad), agg.features(tokens[:, [0, 2, 3]]), atol=1e-12, rtol=0)


def test_zero_init_aggregator_starts_as_the_expert_average():
    agg = Aggregator(8, heads=2, zero_init=True).eval()
    tokens = torch.randn(3, 4, 8)
    torch.testing.assert_close(agg.features(tokens), tokens.mean(1))


def test_aggregator_rejects_heads_that_do_not_divide_dim():
    with pytest.raises(UserError, match="must divide"):
        Aggregator(10, heads=4)


def test_masked_expert_does_not_influence_the_teacher():
    m = make(mask_own_expert=True)
    xs, _ = batch(16)
    xq, yq = batch(16, seed=2)
    own = m.expert_of(1)
    t_before = m.teacher(xs, exclude=own).detach()
    loss_before = m.meta_loss(xs, xq, yq, domain=1)[0].detach()
    with torch.no_grad():
        for p in m.experts[own].parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(m.teacher(xs, exclude=own), t_before, atol=0, rtol=0)  # bit-identical
    torch.testing.assert_close(m.meta_loss(xs, xq, yq, domain=1)[0].detach(), loss_before, atol=0, rtol=0)
    with torch.no_grad():  # any other expert does change the teacher
        for p in m.experts[0].parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(m.teacher(xs, exclude=own), t_before)


def test_without_masking_the_own_expert_does_influence_the_query_loss():
    m = make(mask_own_expert=False)
    xs, _ = batch(16)
    xq, yq = batch(16, seed=2)
    before = m.meta_loss(xs, xq, yq, domain=1)[0].detach()
    with torch.no_grad():
        for p in m.experts[1].parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(m.meta_loss(xs, xq, yq, domain=1)[0].detach(), before)


def test_inner_step_equals_hand_computed_sgd_step():
    m = make(inner_lr=0.37)
    x, _ = batch(16)
    adapted = m.adapt(x)
    s = m.student
    s.eval()
    teacher = m.teacher(x).detach()
    params = list(s.body.parameters())
    grads = torch.autograd.grad(((s.features(x) - teacher) ** 2).mean(), params)
    for (name, p), g in zip(s.body.named_parameters(), grads):
        torch.testing.assert_close(adapted.params["body." + name], p.detach() - 0.37 * g, atol=1e-12, rtol=0)
    for name, p in s.classifier.named_parameters():  # the head is shared, not adapted
        assert torch.equal(adapted.params["classifier." + name], p.detach())


def test_aggregator_gets_meta_gradient_only_with_second_order():
    for first_order in (False, True):
        m = make(first_order=first_order)
        xs, _ = batch(16)
        xq, yq = batch(16, seed=2)
        loss, _ = m.meta_loss(xs, xq, yq, domain=0)
        loss.backward()
        grads = [p.grad for p in m.aggregator.parameters()]
        if first_order:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
        else:
            assert any(g is not None and g.abs().sum() > 1e-8 for g in grads)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
        assert all(p.grad is None for e in m.experts for p in e.parameters())  # experts stay frozen


def test_second_order_meta_gradient_passes_gradcheck():
    m = make()
    m.student.eval()
    xs, _ = batch(8)
    xq, yq = batch(8, seed=2)
    params = dict(m.student.named_parameters())

    def query_loss(target):  # d(query loss after the inner step) / d(teacher feature): the second-order path
        new, _ = m.inner_step(params, xs, target, 0.3, create_graph=True)
        return F.cross_entropy(call_with(m.student, new, xq, logits=True), yq)

    target = m.teacher(xs).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(query_loss, (target,), eps=1e-6, atol=1e-6)


def test_adapt_leaves_stored_weights_unchanged_and_is_repeatable():
    m = make()
    m.student.train()  # even in train mode: adapt must not touch BN running statistics
    before = state(m)
    xa, _ = batch(16, seed=3)
    xb, _ = batch(16, seed=4)
    a1 = m.adapt(xa)
    assert same_state(before, state(m))
    assert m.student.training  # mode restored
    torch.testing.assert_close(a1.predict(xb), m.adapt(xa).predict(xb), atol=0, rtol=0)
    only_b = m.adapt(xb).predict(xb)
    m.adapt(xa)
    torch.testing.assert_close(m.adapt(xb).predict(xb), only_b, atol=0, rtol=0)  # no memory of A
    assert not torch.allclose(a1.predict(xb), m.predict(xb))  # adaptation did something


def test_meta_step_keeps_bn_running_stats_and_moves_student_and_aggregator():
    m = make()
    bufs = {k: v.clone() for k, v in m.student.named_buffers()}
    agg = state(m.aggregator)
    stu = state(m.student)
    xs, _ = batch(16)
    xq, yq = batch(16, seed=2)
    info = m.meta_step(xs, xq, yq, 0, m.meta_optimizers())
    assert set(info) == {"loss_before", "loss_after", "inner_mse"}
    assert all(torch.equal(v, bufs[k]) for k, v in m.student.named_buffers())
    assert not same_state(agg, state(m.aggregator)) and not same_state(stu, state(m.student))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(0, 6, dtype=torch.float64), "non-empty"),
    (torch.zeros(4, 5, dtype=torch.float64), "per-sample shape"),
    (torch.tensor([[float("nan")] * 6] * 4, dtype=torch.float64), "NaN"),
])
def test_bad_input_raises_and_leaves_the_model_unchanged(bad, match):
    m = make()
    before = state(m)
    xq, yq = batch(8, seed=2)
    with pytest.raises(UserError, match=match):
        m.adapt(bad)
    with pytest.raises(UserError, match=match):
        m.meta_step(bad, xq, yq, 0, m.meta_optimizers())
    assert same_state(before, state(m))


def test_backbone_without_features_or_head_gets_a_clear_error():
    with pytest.raises(UserError, match=r"has no features\(\) or head\(\)"):
        MetaDMoE([nn.Linear(6, 8)], None, nn.Linear(6, 8))
    m = make()
    with pytest.raises(UserError, match="Aggregator"):
        MetaDMoE(list(m.experts), None, m.student)


def test_feature_size_mismatch_names_the_problem():
    m = make()
    m.aggregator = Aggregator(4, heads=2)  # experts give D = 8
    with pytest.raises(UserError, match="tokens of shape"):
        m.adapt(batch(8)[0])
