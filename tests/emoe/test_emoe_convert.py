"""convert/revert on every supported architecture (tiny random configs) and the real MiniLM."""

import pytest
import torch

from transferlab.emoe import EMoEConfig, convert, emoe_layers, expert_load, revert

transformers = pytest.importorskip("transformers")

D, FF = 32, 64


def _roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FF))


def _gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=D, n_layer=2, n_head=2, n_inner=FF))


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FF, image_size=8,
        patch_size=4, num_channels=3))


def _gated(name):
    def make():
        cfg = getattr(transformers, f"{name}Config")(vocab_size=50, hidden_size=D, intermediate_size=FF,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=2)
        return getattr(transformers, f"{name}Model")(cfg)
    return make


ARCHS = {"bert": None, "roberta": _roberta, "gpt2": _gpt2, "vit": _vit, "llama": _gated("Llama"),
         "qwen2": _gated("Qwen2"), "mistral": _gated("Mistral")}


@pytest.fixture
def build(tiny_bert):
    """`build(arch)`: a tiny random model of the architecture (BERT from the shared fixture)."""
    return lambda arch: tiny_bert(ff=FF) if arch == "bert" else ARCHS[arch]()


def _inputs(arch):
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(1, 50, (2, 7), generator=g)}


def _out(model, inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_emoe_topk_equals_n_is_dense(arch, build):
    """k == N selects every expert, so the converted model computes the dense function (fwd and grads)."""
    model = build(arch).eval()
    inputs = _inputs(arch)
    ref = _out(model, inputs)
    proj = torch.randn(D, generator=torch.Generator().manual_seed(2))  # LN outputs: sum of squares ~ const
    ref.mul(proj).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, EMoEConfig(num_experts=8, top_k=8, layers="all", kmeans_n_init=1))
    assert len(emoe_layers(model)) == 2
    # the neurons really were permuted (otherwise this test would prove nothing)
    assert any(not torch.equal(sd[k], v) for k, v in model.state_dict().items())
    out = _out(model, inputs)
    assert (out - ref).abs().max().item() <= 1e-5
    out.mul(proj).sum().backward()
    revert(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # gradients of permuted tensors are permuted with them: compare after reverting (grads are not
    # un-permuted by revert, so compare sorted values for FFN tensors and exact for the rest)
    for n, g in ref_grads.items():
        got = grads[n]
        diff = (torch.sort(got.flatten()).values - torch.sort(g.flatten()).values).abs().max().item()
        assert diff <= 1e-5 * max(1.0, g.abs().max().item()) * 10, (n, diff)  # fp32 summation-order noise
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_emoe_revert_convert_bitwise(arch, build):
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    revert(convert(model, EMoEConfig(num_experts=4, top_k=2, layers=(0, -1), kmeans_n_init=1)))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in model.modules()] == classes


def test_emoe_sparse_routing_changes_output_and_counts_load(build):
    model = build("bert").eval()
    inputs = _inputs("bert")
    ref = _out(model, inputs)
    convert(model, EMoEConfig(num_experts=8, top_k=2, layers=(1,), kmeans_n_init=1))
    expert_load(model, track=True)
    out = _out(model, inputs)
    assert (out - ref).abs().max().item() > 1e-4
    load = expert_load(model)[1]
    assert load.sum().item() == 2 * 7 * 2  # tokens * k


def test_emoe_state_dict_keys_unchanged(build):
    model = build("gpt2")
    keys = list(model.state_dict())
    convert(model, EMoEConfig(num_experts=4, top_k=1, kmeans_n_init=1))
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_emoe_minilm_topk_equals_n_is_dense():
    from transformers import AutoModel, AutoTokenizer

    from transferlab.data import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["dog: a domesticated carnivore", "run: move fast by using one's feet"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        convert(model, EMoEConfig(num_experts=16, top_k=16, layers="all", kmeans_n_init=1))
        out = model(**batch).last_hidden_state
    assert (out - ref).abs().max().item() <= 1e-5


def test_emoe_minilm_random_split_topk_equals_n_is_dense():
    """The real MiniLM (all 6 layers, a non-trivial permutation each) at k == N equals dense."""
    from transformers import AutoModel

    from transferlab.data import minilm_path

    model = AutoModel.from_pretrained(minilm_path()).eval()
    ids = torch.tensor([[101, 3899, 1024, 1037, 4968, 2094, 102]])
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        convert(model, EMoEConfig(num_experts=16, top_k=16, layers="all", split="random"))
        out = model(input_ids=ids).last_hidden_state
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_emoe_cuda_topk_equals_n_is_dense_and_revert_bitwise(arch, build):
    model = build(arch).cuda().eval()
    inputs = {k: v.cuda() for k, v in _inputs(arch).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _out(model, inputs)
        convert(model, EMoEConfig(num_experts=8, top_k=8, layers="all", kmeans_n_init=1))
        assert (_out(model, inputs) - ref).abs().max().item() <= 1e-5
    revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_emoe_gated_cluster_on_up_proj_is_still_dense_at_k_equals_n(build):
    model = build("qwen2").eval()
    inputs = _inputs("qwen2")
    with torch.no_grad():
        ref = _out(model, inputs)
        convert(model, EMoEConfig(num_experts=4, top_k=4, layers=(1,), cluster_source="up", kmeans_n_init=1))
        assert (_out(model, inputs) - ref).abs().max().item() <= 1e-5
    host = emoe_layers(model)[0]
    x = torch.randn(3, D)
    up = host.up_proj.weight
    assert torch.allclose(host.emoe_scores(x, up), x @ up.reshape(4, FF // 4, D).mean(1).T, atol=1e-6)
