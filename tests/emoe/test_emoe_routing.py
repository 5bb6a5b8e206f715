"""Gate, selection and gradient semantics of a converted FFN; the controls; the official extras."""

import pytest
import torch

from transferlab.emoe import EMoEConfig, aux_loss, avg_k_gate, convert, emoe_layers, expert_load, revert

transformers = pytest.importorskip("transformers")


def _bert(ff=64):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=ff,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _proj():
    """A fixed random readout: (LayerNorm output)^2 summed would be nearly constant, with ~0 gradient."""
    return torch.randn(32, generator=torch.Generator().manual_seed(5))


def _ids(t=5):
    return torch.randint(1, 50, (1, t), generator=torch.Generator().manual_seed(3))


def test_emoe_gate_is_block_mean_preactivation():
    """avg-k score of expert e = mean over its neurons of (W1 x + b1) minus mean of its b1."""
    model = _bert()
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), kmeans_n_init=1))
    host = emoe_layers(model)[0]
    w, b = host.intermediate.dense.weight, host.intermediate.dense.bias
    x = torch.randn(6, 32)
    pre = (x @ w.T + b).reshape(6, 8, 8).mean(-1) - b.reshape(8, 8).mean(-1)
    assert torch.allclose(host.emoe_scores(x, w), pre, atol=1e-5)
    assert torch.allclose(avg_k_gate(w, 8), w.reshape(8, 8, 32).mean(1))


def test_emoe_gate_no_grad_and_unselected_expert_zero_grad():
    model = _bert()
    convert(model, EMoEConfig(num_experts=8, top_k=1, layers=(1,), kmeans_n_init=1))
    host = emoe_layers(model)[0]
    expert_load(model, track=True)
    out = model(input_ids=_ids(3)).last_hidden_state  # 3 tokens, k=1: at most 3 of 8 experts used
    x = torch.randn(4, 32, requires_grad=True)
    assert not host.emoe_scores(x, host.intermediate.dense.weight).requires_grad  # gate is outside autograd
    out.mul(_proj()).sum().backward()
    load = expert_load(model)[1]
    unused = (load == 0).nonzero().flatten().tolist()
    used = (load > 0).nonzero().flatten().tolist()
    assert unused and used
    w_in, b_in = host.intermediate.dense.weight, host.intermediate.dense.bias
    w_out = host.output.dense.weight
    for e in unused:
        s = slice(8 * e, 8 * (e + 1))
        assert torch.count_nonzero(w_in.grad[s]) == 0
        assert torch.count_nonzero(b_in.grad[s]) == 0
        assert torch.count_nonzero(w_out.grad[:, s]) == 0
    assert any(torch.count_nonzero(w_in.grad[8 * e: 8 * (e + 1)]) > 0 for e in used)
    # no Parameter was added for the gate, so an optimiser has nothing to update there
    assert not [n for n, _ in model.named_parameters() if "gate" in n or "router" in n]


def test_emoe_gate_tracks_live_keys_after_optimizer_step():
    model = _bert()
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), kmeans_n_init=1))
    host = emoe_layers(model)[0]
    w = host.intermediate.dense.weight
    x = torch.randn(3, 32)
    before = host.emoe_scores(x, w).clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(input_ids=_ids()).last_hidden_state.mul(_proj()).sum().backward()
    opt.step()
    after = host.emoe_scores(x, w)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, x @ avg_k_gate(w, 8).T, atol=1e-6)


@pytest.mark.parametrize("split", ["balanced-kmeans", "random", "contiguous"])
def test_emoe_splits_give_permutations(split):
    model = _bert()
    w0 = model.encoder.layer[0].intermediate.dense.weight.detach().clone()
    convert(model, EMoEConfig(num_experts=4, top_k=2, layers=(0,), split=split, kmeans_n_init=1))
    perm = emoe_layers(model)[0].emoe_state.perm
    assert torch.equal(torch.sort(perm).values, torch.arange(64))
    assert torch.equal(model.encoder.layer[0].intermediate.dense.weight, w0[perm])
    if split == "contiguous":
        assert torch.equal(perm, torch.arange(64))


def test_emoe_bottom_k_picks_lowest_scores():
    model = _bert()
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), select="bottom-k", kmeans_n_init=1))
    host = emoe_layers(model)[0]
    expert_load(model, track=True)
    x = torch.randn(1, 1, 32)
    host.feed_forward_chunk(x)
    scores = host.emoe_scores(x.reshape(1, 32), host.intermediate.dense.weight)
    chosen = set(expert_load(model)[0].nonzero().flatten().tolist())
    assert chosen == set(scores.topk(2, largest=False).indices.flatten().tolist())


def test_emoe_learned_gate_gets_gradient_and_reverts_cleanly():
    model = _bert()
    keys = list(model.state_dict())
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), gate="learned", kmeans_n_init=1))
    host = emoe_layers(model)[0]
    model(input_ids=_ids()).last_hidden_state.mul(_proj()).sum().backward()
    assert host.emoe_router.grad is not None and host.emoe_router.grad.abs().sum() > 0
    revert(model)
    assert list(model.state_dict()) == keys


def test_emoe_official_extras_are_off_by_default_and_work_when_on():
    cfg = EMoEConfig()
    assert (cfg.aux_loss_weight, cfg.gate_noise, cfg.capacity_factor, cfg.expert_dropout) == (0.0, 0.0, None, 0.0)
    model = _bert()
    convert(model, EMoEConfig(num_experts=8, top_k=8, layers=(0,), kmeans_n_init=1, capacity_factor=0.5,
                              aux_loss_weight=0.01, gate_noise=1.0, expert_dropout=0.1))
    model.eval()
    ref_model = _bert().eval()
    ids = _ids(16)
    # every token picks every expert (k = N), capacity k*floor(0.5*ceil(16/8)) = 8 < 16 pairs per expert:
    # tokens 8..15 lose all pairs, so the output differs from dense even in eval (no dropout, no noise)
    assert (model(input_ids=ids).last_hidden_state - ref_model(input_ids=ids).last_hidden_state).abs().max() > 1e-4
    model.train()
    model(input_ids=ids).last_hidden_state.mul(_proj()).sum().backward()
    assert aux_loss(model).item() > 0


def test_emoe_capacity_drops_overflow_pairs_in_token_order():
    from transferlab.emoe.layer import _capacity_keep

    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    keep = _capacity_keep(idx, 4, 1.0)  # capacity = k * floor(1.0 * ceil(4 / 4)) = 2 pairs per expert
    assert keep.tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
    assert _capacity_keep(idx, 4, 2.0).sum().item() == 8  # capacity 4: nothing dropped
