"""Gate, selection and gradient semantics of a converted FFN; the controls; the official extras."""

import pytest
import torch

from transferlab.emoe import EMoEConfig, aux_loss, avg_k_gate, convert, emoe_layers, expert_load, revert

transformers = pytest.importorskip("transformers")


def _proj():
    """A fixed random readout: (LayerNorm output)^2 summed would be nearly constant, with ~0 gradient."""
    return torch.randn(32, generator=torch.Generator().manual_seed(5))


def _ids(t=5):
    return torch.randint(1, 50, (1, t), generator=torch.Generator().manual_seed(3))


def test_emoe_gate_is_block_mean_preactivation(tiny_bert):
    """avg-k score of expert e = mean over its neurons of (W1 x + b1) minus mean of its b1."""
    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), kmeans_n_init=1))
    host = emoe_layers(model)[0]
    w, b = host.intermediate.dense.weight, host.intermediate.dense.bias
    x = torch.randn(6, 32)
    pre = (x @ w.T + b).reshape(6, 8, 8).mean(-1) - b.reshape(8, 8).mean(-1)
    assert torch.allclose(host.emoe_scores(x, w), pre, atol=1e-5)
    assert torch.allclose(avg_k_gate(w, 8), w.reshape(8, 8, 32).mean(1))


def test_emoe_gate_no_grad_and_unselected_expert_zero_grad(tiny_bert):
    model = tiny_bert(dropout=0.0)
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


def test_emoe_gate_tracks_live_keys_after_optimizer_step(tiny_bert):
    model = tiny_bert(dropout=0.0)
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
def test_emoe_splits_give_permutations(split, tiny_bert):
    model = tiny_bert(dropout=0.0)
    w0 = model.encoder.layer[0].intermediate.dense.weight.detach().clone()
    convert(model, EMoEConfig(num_experts=4, top_k=2, layers=(0,), split=split, kmeans_n_init=1))
    perm = emoe_layers(model)[0].emoe_state.perm
    assert torch.equal(torch.sort(perm).values, torch.arange(64))
    assert torch.equal(model.encoder.layer[0].intermediate.dense.weight, w0[perm])
    if split == "contiguous":
        assert torch.equal(perm, torch.arange(64))


def test_emoe_bottom_k_picks_lowest_scores(tiny_bert):
    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), select="bottom-k", kmeans_n_init=1))
    host = emoe_layers(model)[0]
    expert_load(model, track=True)
    x = torch.randn(1, 1, 32)
    host.feed_forward_chunk(x)
    scores = host.emoe_scores(x.reshape(1, 32), host.intermediate.dense.weight)
    chosen = set(expert_load(model)[0].nonzero().flatten().tolist())
    assert chosen == set(scores.topk(2, largest=False).indices.flatten().tolist())


def test_emoe_official_extras_are_off_by_default_and_work_when_on(tiny_bert):
    cfg = EMoEConfig()
    assert (cfg.aux_loss_weight, cfg.gate_noise, cfg.capacity_factor, cfg.expert_dropout) == (0.0, 0.0, None, 0.0)
    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=8, top_k=8, layers=(0,), kmeans_n_init=1, capacity_factor=0.5,
                              aux_loss_weight=0.01, gate_noise=1.0, expert_dropout=0.1))
    model.eval()
    ref_model = tiny_bert(dropout=0.0).eval()
    ids = _ids(16)
    # every token picks every expert (k = N), capacity k*floor(0.5*ceil(16/8)) = 8 < 16 pairs per expert:
    # tokens 8..15 lose all pairs, so the output differs from dense even in eval (no dropout, no noise)
    assert (model(input_ids=ids).last_hidden_state - ref_model(input_ids=ids).last_hidden_state).abs().max() > 1e-4
    model.train()
    model(input_ids=ids).last_hidden_state.mul(_proj()).sum().backward()
    assert aux_loss(model).item() > 0


def test_emoe_capacity_is_batch_prioritised_worked_example():
    """Tutel's order: every first choice before any second choice; inside a choice rank, best score first."""
    from transferlab.emoe.layer import capacity_keep

    # k=1, N=2, T=4: capacity = 1 * floor(1.0 * ceil(4/2)) = 2. All four tokens want expert 0; the two with
    # the highest priority (tokens 3 and 1) keep it, whatever their position in the batch.
    idx = torch.tensor([[0], [0], [0], [0]])
    keep = capacity_keep(idx, torch.tensor([0.1, 0.5, 0.2, 0.9]), 2, 1.0)
    assert keep.flatten().tolist() == [0, 1, 0, 1]
    # k=2, N=4, T=4: capacity = 2 * floor(1.0 * ceil(4/4)) = 2, priority t0 > t1 > t2 > t3.
    # expert 0 queue: first choices t0, t2, then second choices t1, t3 -> t1's and t3's second slots drop.
    # (token order would have dropped t2's and t3's pairs instead.)
    idx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])
    keep = capacity_keep(idx, torch.tensor([0.9, 0.8, 0.7, 0.6]), 4, 1.0)
    assert keep.tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]]
    assert capacity_keep(idx, torch.tensor([0.9, 0.8, 0.7, 0.6]), 4, 2.0).sum().item() == 8  # capacity 4


def test_emoe_capacity_priority_comes_from_the_layer_scores(tiny_bert):
    """Inside the layer, the tokens that keep their expert are those with the largest top softmax score."""
    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=2, top_k=1, layers=(0,), kmeans_n_init=1, capacity_factor=0.5))
    host = emoe_layers(model)[0].eval()
    w = host.intermediate.dense.weight
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    s = host.emoe_scores(x, w)
    p = torch.softmax(s, 1)
    host.emoe_state.record = True
    y = host.emoe_ffn(x, w, host.intermediate.dense.bias, host.output.dense.weight,
                      host.intermediate.intermediate_act_fn, key=w)
    best = s.argmax(1)
    cap = int(0.5 * 4)  # k * floor(cf * ceil(T / N))
    for e in range(2):
        mine = (best == e).nonzero().flatten()
        kept = mine[p[mine, e].argsort(descending=True)[:cap]]
        dropped = sorted(set(mine.tolist()) - set(kept.tolist()))
        assert all(y[t].abs().sum() == 0 for t in dropped)
        assert all(y[t].abs().sum() > 0 for t in kept.tolist())


def test_emoe_aux_loss_is_tutel_load_importance_with_gradient_into_hidden_states(tiny_bert):
    from torch.distributions.normal import Normal

    from transferlab.emoe.layer import load_importance_loss

    g = torch.Generator().manual_seed(0)
    logits, noise = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g) / 4
    noisy = logits + noise
    idx = noisy.topk(2, dim=1).indices
    probs = torch.softmax(logits, 1)
    imp = probs.sum(0)
    load = Normal(0.0, 1.0 / 4).cdf(probs - noisy.gather(1, idx)[:, -1:]).sum(0)
    want = (imp.var() / imp.mean() ** 2 + load.var() / load.mean() ** 2) / 2
    assert load_importance_loss(logits, noisy, idx, 4, 1.0).item() == pytest.approx(want.item(), rel=1e-5)

    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(1,), kmeans_n_init=1, aux_loss_weight=0.01,
                              gate_noise=1.0))
    model.train()
    emb = model.embeddings(input_ids=_ids(6)).detach().requires_grad_(True)
    model.encoder(emb)
    loss = aux_loss(model)
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # reaches the hidden states below the layer
    host = emoe_layers(model)[0]
    assert host.intermediate.dense.weight.grad is None  # the frozen gate's keys get nothing from it
    with pytest.raises(Exception, match="gate_noise > 0"):
        EMoEConfig(aux_loss_weight=0.01)


def test_emoe_learn_is_tutel_cosine_router_with_renormalised_weights(tiny_bert):
    import torch.nn.functional as F

    model = tiny_bert(dropout=0.0)
    keys = list(model.state_dict())
    torch.manual_seed(3)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), gate="learned", kmeans_n_init=1))
    host = emoe_layers(model)[0].eval()
    r = host.emoe_router
    assert r.projector.weight.shape == (256, 32) and r.sim_matrix.shape == (256, 8)
    assert 0.005 < r.sim_matrix.std().item() < 0.02  # N(0, 0.01) random init, not the avg-k centroids
    w, b, wo = host.intermediate.dense.weight, host.intermediate.dense.bias, host.output.dense.weight
    act = host.intermediate.intermediate_act_fn
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    logits = F.normalize(r.projector(x), dim=1) @ F.normalize(r.sim_matrix, dim=0) * 2.0  # exp(log(1/0.5))
    top = torch.softmax(logits, 1).topk(2, dim=1)
    wts = top.values / top.values.sum(1, keepdim=True)
    h = act(x @ w.T + b)
    want = sum(wts[:, j:j + 1] * (h * F.one_hot(top.indices[:, j], 8).repeat_interleave(8, 1)) for j in range(2))
    got = host.emoe_ffn(x, w, b, wo, act, key=w)
    assert torch.allclose(got, want @ wo.T, atol=1e-5)
    host.train()
    model(input_ids=_ids()).last_hidden_state.mul(_proj()).sum().backward()
    assert r.sim_matrix.grad.abs().sum() > 0 and r.projector.weight.grad.abs().sum() > 0
    revert(model)
    assert list(model.state_dict()) == keys


def test_emoe_gate_is_fresh_after_writes_through_data(tiny_bert):
    """.data writes do not bump the version counter; the gate must still follow the new keys."""
    model = tiny_bert(dropout=0.0)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(0,), kmeans_n_init=1))
    host = emoe_layers(model)[0]
    w = host.intermediate.dense.weight
    x = torch.randn(3, 32)
    host.emoe_scores(x, w)
    version = w._version
    w.data.copy_(torch.randn_like(w))
    assert w._version == version
    assert torch.allclose(host.emoe_scores(x, w), x @ avg_k_gate(w, 8).T, atol=1e-6)


def test_emoe_vit_split_layout_is_refused_with_the_fix():
    from torch import nn

    from transferlab.core.errors import UserError

    vit_intermediate = type("ViTIntermediate", (nn.Module,), {})
    model = nn.Sequential(vit_intermediate())
    with pytest.raises(UserError, match="transformers >= 5"):
        convert(model, EMoEConfig())
