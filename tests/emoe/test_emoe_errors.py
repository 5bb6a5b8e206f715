"""Bad input gets a clear UserError (a ValueError) that names the fix, and leaves the model untouched."""

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.emoe import EMoEConfig, convert, revert

transformers = pytest.importorskip("transformers")


def test_emoe_unsupported_model_names_archs_and_register_adapter():
    with pytest.raises(UserError) as e:
        convert(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), EMoEConfig())
    msg = str(e.value)
    for word in ("BertLayer", "GPT2MLP", "ViTMLP", "LlamaMLP", "Qwen2MLP", "MistralMLP", "register_adapter"):
        assert word in msg


def test_emoe_num_experts_must_divide_dff_and_model_is_untouched(tiny_bert):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="must divide the FFN width d_ff=64"):
        convert(model, EMoEConfig(num_experts=6, top_k=2, layers=(0, 1)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="no EMoE layers"):
        revert(model)  # nothing was converted


@pytest.mark.parametrize("k", [0, 9, -1])
def test_emoe_top_k_out_of_range(k):
    with pytest.raises(ValueError, match="top_k"):
        EMoEConfig(num_experts=8, top_k=k)


def test_emoe_double_convert_and_revert_dense(tiny_bert):
    model = tiny_bert()
    convert(model, EMoEConfig(num_experts=4, top_k=2, kmeans_n_init=1))
    with pytest.raises(UserError, match="already EMoE-converted; call transferlab.emoe.revert"):
        convert(model, EMoEConfig(num_experts=4, top_k=2))
    revert(model)
    with pytest.raises(UserError, match="already dense"):
        revert(model)


def test_emoe_bad_layer_index_and_choices(tiny_bert):
    with pytest.raises(UserError, match="out of range: the model has 2 FFN layers"):
        convert(tiny_bert(), EMoEConfig(num_experts=4, top_k=2, layers=(5,)))
    with pytest.raises(UserError, match="choose one of"):
        EMoEConfig(split="kmeans")
    with pytest.raises(UserError, match="'all'"):
        EMoEConfig(layers="last")
