"""convert / transfer / merge / learngene save-load on transferlab's DiT and on diffusers' DiT."""

import copy
import inspect

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.kind import (
    KindConfig,
    KindLinear,
    convert,
    extract_learngenes,
    from_pretrained,
    kind_stats,
    load_learngenes,
    merge,
    save_learngenes,
    save_pretrained,
)
from transferlab.kind import transfer as kind_transfer
from transferlab.kind.model import TRAINABLE_GROUPS, fit
from transferlab.nn.diffusion import Diffusion
from transferlab.nn.dit import DiT


def _dit(width=16, classes=3):
    torch.manual_seed(0)
    m = DiT(image_size=8, patch=4, width=width, depth=2, heads=2, num_classes=classes)
    with torch.no_grad():  # leave adaLN-Zero's identity start so that every layer matters in the tests
        for n, p in m.named_parameters():
            if "adaLN_modulation" in n or "final_layer" in n:
                p.normal_(std=0.1)
    return m


def _inputs(b=4, classes=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        torch.randint(0, classes, (b,), generator=g)


def test_converted_dit_at_full_rank_reproduces_the_dense_forward():
    dense = _dit()
    kind = convert(copy.deepcopy(dense), KindConfig(n_learngene=8, n_tailor=8, init="svd", gate=False))
    x, t, y = _inputs()
    torch.testing.assert_close(kind(x, t, y), dense(x, t, y), atol=1e-5, rtol=1e-5)
    assert len([m for m in kind.modules() if isinstance(m, KindLinear)]) == 2 * 6  # q,k,v,o,fc1,fc2 per block
    assert inspect.signature(kind.forward) == inspect.signature(dense.forward)


def test_transfer_freezes_learngenes_bit_for_bit_and_trains_tailors():
    model = convert(_dit(), KindConfig(n_learngene=8, n_tailor=8))
    genes = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("U_g", "s_g", "V_g"))}
    report = kind_transfer(model, new_classes=2, train=("label_embed",))
    tailors = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("U_t", "s_t", "V_t"))}
    labels = model.y_embed.weight.detach().clone()
    label_params = sum(p.numel() for n, p in model.named_parameters()
                       if any(f in n for f in TRAINABLE_GROUPS["label_embed"]))
    assert report["trainable"] == report["tailor_formula"] + label_params
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 2, (32,))
    fit(model, x, y, diffusion=Diffusion(50), steps=4, batch_size=16, lr=1e-2, weight_decay=0.1)
    for n, p in model.named_parameters():
        if n in genes:
            assert torch.equal(p, genes[n]), n
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in tailors.items())
    assert not torch.equal(model.y_embed.weight, labels)
    assert kind_stats(model)["trainable"] == report["trainable"]


def test_merge_equals_gated_forward_for_the_class():
    model = convert(_dit(), KindConfig(n_learngene=6, n_tailor=9, k_active=3))
    x, t, _ = _inputs()
    for c in range(3):
        y = torch.full((4,), c)
        merged = merge(model, c, copy=True)
        torch.testing.assert_close(merged(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)
        assert not any(isinstance(m, KindLinear) for m in merged.modules())
        assert any(isinstance(m, KindLinear) for m in model.modules())  # copy=True leaves the model as it is
    with pytest.raises(UserError, match="merged for class 2"):
        merged(x, t, torch.tensor([2, 2, 1, 2]))
    with pytest.raises(UserError, match="outside the gate"):
        merge(model, 7)
    # default: in place, the same object comes back
    y = torch.full((4,), 1)
    before = model(x, t, y)
    assert merge(model, 1) is model and not any(isinstance(m, KindLinear) for m in model.modules())
    torch.testing.assert_close(model(x, t, y), before, atol=1e-5, rtol=1e-5)


def test_classes_route_differently_and_bad_labels_fail_before_any_compute():
    model = convert(_dit(), KindConfig(n_learngene=6, n_tailor=9, k_active=3))
    x, t, _ = _inputs()
    a, b = model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)
    with pytest.raises(UserError, match="class id 5 is outside the gate"):
        model(x, t, torch.tensor([0, 1, 5, 2]))


def test_learngene_save_load_round_trip(tmp_path):
    cfg = KindConfig(n_learngene=8, n_tailor=8)
    src = convert(_dit(), cfg)
    with torch.no_grad():  # trained-looking biases: they are class-agnostic and travel with include_dense
        for m in src.modules():
            if isinstance(m, KindLinear):
                m.bias.normal_()
    save_learngenes(src, tmp_path / "genes.safetensors", include_dense=True)
    from safetensors import safe_open

    with safe_open(tmp_path / "genes.safetensors", "pt") as f:  # a plain safetensors file, no pickle
        assert not any(k.endswith(("U_t", "s_t", "V_t")) or "y_embed" in k for k in f.keys())
    torch.manual_seed(123)
    dst = convert(DiT(image_size=8, patch=4, width=16, depth=2, heads=2, num_classes=3), cfg)
    load_learngenes(dst, tmp_path / "genes.safetensors")
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        if n.endswith(("U_g", "s_g", "V_g")):
            assert torch.equal(p, q), n
    # the null label uses learngenes only, so with the dense parts loaded the outputs agree exactly
    with torch.no_grad():
        dst.y_embed.weight.copy_(src.y_embed.weight)
    x, t, _ = _inputs()
    null = torch.full((4,), 3)
    torch.testing.assert_close(dst(x, t, null), src(x, t, null), atol=1e-6, rtol=0)


def test_loading_learngenes_into_another_shape_is_a_clear_error_and_changes_nothing(tmp_path):
    genes = extract_learngenes(convert(_dit(width=16), KindConfig(n_learngene=8, n_tailor=8)))
    other = convert(_dit(width=24), KindConfig(n_learngene=8, n_tailor=8))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(UserError, match="same width"):
        load_learngenes(other, genes)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    fewer = convert(_dit(width=16), KindConfig(n_learngene=4, n_tailor=8))
    with pytest.raises(UserError, match="n_learngene"):
        load_learngenes(fewer, genes)
    with pytest.raises(UserError, match="does not exist"):
        load_learngenes(other, tmp_path / "missing.safetensors")


def test_convert_rejects_too_many_components_before_touching_the_model():
    model = _dit(width=16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="allow_overcomplete"):
        convert(model, KindConfig(n_learngene=12, n_tailor=8))
    assert not hasattr(model, "kind_gate")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ok = convert(model, KindConfig(n_learngene=12, n_tailor=8, allow_overcomplete=True))
    assert ok(*_inputs()).shape == (4, 1, 8, 8)
    with pytest.raises(UserError, match="already converted"):
        convert(model)


def test_convert_on_diffusers_dit_keeps_its_forward_signature():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dense = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    sig = inspect.signature(dense.forward)
    kind = convert(copy.deepcopy(dense), KindConfig(n_learngene=8, n_tailor=8, init="svd"))
    assert inspect.signature(kind.forward) == sig
    assert len([m for m in kind.modules() if isinstance(m, KindLinear)]) == 2 * 6
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3])
    # full rank with every tailor on (null_class=all_tailors irrelevant here): class routing changes the output,
    # the all-tailor model equals the original
    full = convert(copy.deepcopy(dense), KindConfig(n_learngene=8, n_tailor=8, init="svd", gate=False))
    torch.testing.assert_close(full(x, timestep=t, class_labels=y).sample, dense(x, timestep=t, class_labels=y).sample,
                               atol=1e-5, rtol=1e-5)
    out = kind(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert out.shape == x.shape
    with pytest.raises(UserError, match="outside the gate"):
        kind(x, timestep=t, class_labels=torch.tensor([1, 11]))


def test_transfer_on_diffusers_dit_to_another_number_of_classes_resizes_every_class_embedder():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    convert(model, KindConfig(n_learngene=4, n_tailor=8))
    genes = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("U_g", "s_g", "V_g"))}
    report = kind_transfer(model, 3)
    embedders = [m for n, m in model.named_modules() if n.endswith("class_embedder")]
    assert len(embedders) == 2  # one per block
    assert all(m.num_classes == 3 and m.embedding_table.num_embeddings == 4 for m in embedders)
    assert model.config.num_embeds_ada_norm == 3 and model.kind_gate.num_classes == 3
    assert all(m.embedding_table.weight.requires_grad for m in embedders)
    assert report["tailor"] == report["tailor_formula"]
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 500, 20, 30])
    y = torch.tensor([0, 1, 2, 3])  # 3 = the new null label
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(x, timestep=t, class_labels=y).sample.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, genes[n]) for n, p in model.named_parameters() if n in genes)
    with pytest.raises(UserError, match="outside the gate"):
        model(x, timestep=t, class_labels=torch.tensor([0, 1, 2, 4]))


def test_kind_config_round_trips_through_a_dict_and_refuses_unknown_keys():
    import json

    cfg = KindConfig(n_learngene=5, n_tailor=7, k_active=2, assignment="random", gate=False, targets=("q", "fc2"))
    assert KindConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown KindConfig field"):
        KindConfig.from_dict({**cfg.to_dict(), "n_tailors": 3})


def test_save_pretrained_from_pretrained_gives_identical_outputs_after_transfer(tmp_path):
    import json

    model = convert(_dit(), KindConfig(n_learngene=6, n_tailor=9, k_active=3, assignment="random", gate_seed=4))
    kind_transfer(model, 2, n_tailor=4, k_active=2)  # another number of classes and of tailors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(model, tmp_path / "m")
    blob = json.loads((tmp_path / "m" / "transferlab_config.json").read_text())
    assert blob["method"] == "kind" and blob["version"] == 1 and blob["num_classes"] == 2
    assert blob["config"]["n_tailor"] == 4 and blob["config"]["k_active"] == 2
    loaded = from_pretrained(tmp_path / "m", _dit())  # base model built for 3 classes
    x, t, _ = _inputs()
    y = torch.tensor([0, 1, 2, 1])  # 2 = the null label now
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)
    assert torch.equal(loaded.kind_gate.table, model.kind_gate.table)


def test_from_pretrained_refuses_other_methods_and_incomplete_folders(tmp_path):
    import json

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "transferlab_config.json").write_text(json.dumps({"method": "emoe", "version": 1}))
    with pytest.raises(UserError, match="not KIND"):
        from_pretrained(tmp_path / "e", _dit())
    with pytest.raises(UserError, match="not written by transferlab.kind.save_pretrained"):
        from_pretrained(tmp_path / "nothing", _dit())
    save_pretrained(convert(_dit(), KindConfig(n_learngene=6, n_tailor=9)), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete"):
        from_pretrained(tmp_path / "m", _dit())


def test_zero_start_tailors_begin_at_the_learngene_only_layers_and_still_train():
    model = convert(_dit(), KindConfig(n_learngene=6, n_tailor=9, k_active=3))
    kind_transfer(model, 2, tailor_init_scale=0.0)
    layers = [m for m in model.modules() if isinstance(m, KindLinear)]
    assert all(torch.equal(m.s_t, torch.zeros_like(m.s_t)) for m in layers)
    x, t, _ = _inputs()
    loss = model(x, t, torch.tensor([0, 1, 0, 1])).square().mean()
    loss.backward()
    assert any(m.s_t.grad.abs().sum() > 0 for m in layers)  # s moves first, then U and V follow
    with pytest.raises(UserError, match="tailor_init_scale"):
        kind_transfer(model, 2, tailor_init_scale=-1.0)


def test_diffusers_dit_round_trips_through_save_pretrained_after_transfer(tmp_path):
    diffusers = pytest.importorskip("diffusers")

    def base():
        torch.manual_seed(0)
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)

    model = convert(base(), KindConfig(n_learngene=4, n_tailor=8))
    kind_transfer(model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(model, tmp_path / "d")
    loaded = from_pretrained(tmp_path / "d", base())
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 20]), torch.tensor([0, 2, 3])
    model.eval(), loaded.eval()
    want = model(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(loaded(x, timestep=t, class_labels=y).sample, want, atol=0, rtol=0)
