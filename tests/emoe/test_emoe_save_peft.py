"""Save/load with stored permutations; PEFT LoRA on attention; balanced clustering; task data."""

import json

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.emoe import (
    EMoEConfig,
    balanced_kmeans,
    convert,
    emoe_config,
    emoe_layers,
    from_pretrained,
    revert,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")


IDS = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("gate", ["avg-k", "learned"])
def test_emoe_save_load_identical_outputs(tmp_path, gate, tiny_bert):
    model = convert(tiny_bert(), EMoEConfig(num_experts=8, top_k=2, layers="all", kmeans_n_init=1, gate=gate)).eval()
    with torch.no_grad():  # "fine-tune" a little so the saved weights differ from the init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ref = model(input_ids=IDS).last_hidden_state
    assert save_pretrained(model, tmp_path) == tmp_path
    assert len(emoe_layers(model)) == 2  # still converted after saving
    blob = json.loads((tmp_path / "transferlab_config.json").read_text())
    assert blob["method"] == "emoe" and blob["version"] == 1 and set(blob["permutations"]) == {"0", "1"}
    assert EMoEConfig.from_dict(blob["config"]) == emoe_config(model)[0]
    base = tiny_bert()
    loaded = from_pretrained(tmp_path, base).eval()
    assert loaded is base
    with torch.no_grad():
        out = loaded(input_ids=IDS).last_hidden_state
    assert torch.equal(out, ref)
    assert emoe_config(loaded)[1] == emoe_config(model)[1]
    # the file's FFN tensors are in the dense neuron order (EMoE2Dense serving)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["encoder.layer.0.intermediate.dense.weight"],
                       revert(loaded).state_dict()["encoder.layer.0.intermediate.dense.weight"])


def test_emoe_config_round_trip_and_unknown_keys():
    cfg = EMoEConfig(num_experts=8, top_k=2, layers=(1, -1), capacity_factor=1.5, gate_noise=1.0,
                     aux_loss_weight=0.01)
    assert EMoEConfig.from_dict(cfg.to_dict()) == cfg
    assert EMoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown keys"):
        EMoEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_emoe_from_pretrained_wrong_folder_errors(tmp_path, tiny_bert):
    with pytest.raises(UserError, match="transferlab_config.json"):
        from_pretrained(tmp_path, tiny_bert())
    (tmp_path / "transferlab_config.json").write_text(json.dumps({"method": "kind", "version": 1, "config": {}}))
    with pytest.raises(UserError, match="not EMoE"):
        from_pretrained(tmp_path, tiny_bert())


def test_emoe_deprecated_aliases_warn():
    import transferlab.emoe as emoe

    with pytest.warns(DeprecationWarning, match="use transferlab.emoe.convert"):
        assert emoe.convert_to_emoe is convert
    assert "convert_to_emoe" not in emoe.__all__ and "check_backbone" not in emoe.__all__


def test_emoe_with_peft_lora_on_attention(tiny_bert):
    peft = pytest.importorskip("peft")
    model = convert(tiny_bert(), EMoEConfig(num_experts=8, top_k=2, layers=(1,), kmeans_n_init=1))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = lora(input_ids=IDS).last_hidden_state
    out.mul(torch.randn(32)).sum().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    # LoRA first, then convert, also works; LoRA on the FFN itself is refused with a fix
    other = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    convert(other, EMoEConfig(num_experts=8, top_k=2, layers=(0,), kmeans_n_init=1))
    assert len(emoe_layers(other)) == 1
    bad = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["dense"]))
    with pytest.raises(UserError, match="attention layers only"):
        convert(bad, EMoEConfig(num_experts=8, top_k=2, layers=(0,)))


def test_emoe_balanced_kmeans_exact_sizes_deterministic_and_better_than_random():
    from transferlab.emoe import mean_cosine_to_centroid

    g = torch.Generator().manual_seed(0)
    # 4 planted directions + noise: clustering must find structure a random split does not have
    centers = torch.randn(4, 16, generator=g)
    keys = centers.repeat_interleave(24, 0) + 0.5 * torch.randn(96, 16, generator=g)
    keys = keys[torch.randperm(96, generator=g)]
    a = balanced_kmeans(keys, 8, seed=1, n_init=2)
    b = balanced_kmeans(keys, 8, seed=1, n_init=2)
    assert torch.equal(a, b)
    assert torch.bincount(a, minlength=8).tolist() == [12] * 8
    rand = torch.randperm(96, generator=g) % 8
    assert mean_cosine_to_centroid(keys, a, 8) > mean_cosine_to_centroid(keys, rand, 8) + 0.2


def test_emoe_balanced_assignment_is_optimal_on_small_problem():
    """The auction matches brute force over all balanced assignments of 6 points into 3 pairs."""
    import itertools

    from transferlab.emoe.cluster import balanced_assign

    sim = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    labels, _ = balanced_assign(sim, 2)
    best = max(sum(sim[i, c].item() for i, c in enumerate(p))
               for p in set(itertools.permutations([0, 0, 1, 1, 2, 2])))
    got = sum(sim[i, c].item() for i, c in enumerate(labels.tolist()))
    assert got == pytest.approx(best, abs=1e-6)
    assert torch.bincount(labels).tolist() == [2, 2, 2]


def test_emoe_wordnet_split_is_by_synset_and_ood_uses_examples():
    from transferlab.emoe.data import accuracy_macro_f1, supersense_data

    d = supersense_data(300, 40, 80, 0)
    assert len(d.train.texts) == 300 and len(d.val.texts) == 40 and len(d.test_id.texts) == 80
    assert len(d.test_ood.texts) >= 80  # every test synset has at least one example
    train_lemmas = set(d.train.texts)
    assert not train_lemmas & set(d.test_id.texts)
    assert all(": " in t for t in d.test_ood.texts)
    assert int(d.train.labels.max()) < 39
    acc, f1 = accuracy_macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 39)
    assert acc == pytest.approx(200 / 3) and f1 == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
