"""Per-architecture adapters: where an FFN lives, which rows are its keys, how to permute it.

An adapter names the class of the module that *hosts* one FFN (a BERT layer, a GPT-2 MLP, a Llama
MLP), the key rows used for clustering and gating, the Parameters whose neuron axis is permuted,
and a mixin whose forward routes through the experts. convert() swaps the host's class for a
subclass of (mixin, original class), so the module keeps its Parameters and state_dict keys and
revert() simply restores the class.

Register your own with `register_adapter(Adapter(...))`; docs/emoe.md, section "Other architectures",
walks through one.

Supported transformers layouts: BERT/RoBERTa `BertLayer`/`RobertaLayer`, GPT-2 `GPT2MLP`, gated
`LlamaMLP`/`Qwen2MLP`/`MistralMLP` in every transformers release the package admits (>= 4.40), and ViT
as `ViTMLP` (fc1/fc2, transformers >= 5). transformers 4.x splits ViT's FFN over `ViTIntermediate` and
`ViTOutput`, whose residual add sits inside the FFN's second half; that layout is refused with a
message (`refusal_for`) rather than converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError
from .layer import EMoEMixin


@dataclass(frozen=True)
class Adapter:
    """How to convert one family of FFN hosts.

    name: short family name used in messages and in emoe_config.json.
    host_classes: class names (type(module).__name__) of modules that own exactly one FFN.
    key: host, config -> (d_ff, d) key rows (clustering input and avg-k gate source).
    permuted: host -> [(Parameter or None, neuron axis)], every tensor indexed by the FFN neurons.
    mixin: an EMoEMixin subclass overriding the host's forward (or feed-forward method).
    check: optional host -> None that raises UserError for unsupported variants (e.g. a GLU gate bias).
    """

    name: str
    host_classes: tuple[str, ...]
    key: Callable[[nn.Module, object], torch.Tensor]
    permuted: Callable[[nn.Module], list[tuple[nn.Parameter | None, int]]]
    mixin: type
    check: Callable[[nn.Module], None] | None = None


_ADAPTERS: dict[str, Adapter] = {}
_CLASSES: dict[tuple[type, type], type] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Add (or replace) an adapter; its host class names then become convertible."""
    if not issubclass(adapter.mixin, EMoEMixin):
        raise TypeError("Adapter.mixin must subclass transferlab.emoe.layer.EMoEMixin")
    for cls in adapter.host_classes:
        _ADAPTERS[cls] = adapter
    return adapter


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of an FFN host, converted (looked up by its original class) or not."""
    st = getattr(module, "emoe_state", None)
    cls = st.original_class if st is not None else type(module)
    return _ADAPTERS.get(cls.__name__)


# module class names of layouts EMoE recognises but refuses, with the fix
_REFUSED = {
    "ViTIntermediate": "this transformers version (4.x) splits ViT's FFN over ViTIntermediate and ViTOutput, "
                       "which EMoE does not convert; install transformers >= 5 (ViT's FFN is one ViTMLP there)",
}


def refusal_for(model: nn.Module) -> str | None:
    """The reason a recognised-but-unsupported FFN layout in `model` is refused, or None."""
    for m in model.modules():
        why = _REFUSED.get(type(m).__name__)
        if why is not None:
            return why
    return None


def supported_architectures() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for cls, a in _ADAPTERS.items():
        out[a.name] = out.get(a.name, ()) + (cls,)
    return out


def emoe_class(original: type, mixin: type) -> type:
    """The converted class: mixin first in the MRO so its forward wins. Cached per pair."""
    key = (original, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"EMoE{original.__name__}", (mixin, original), {"__module__": __name__})
    return _CLASSES[key]


def check_no_lora(*modules: nn.Module) -> None:
    """PEFT LoRA wrappers expose the *base* weight as `.weight`; routing through it would silently
    drop the LoRA delta, so a LoRA-wrapped FFN linear is refused."""
    for m in modules:
        if hasattr(m, "base_layer"):
            raise UserError("a LoRA (PEFT) adapter wraps an FFN linear layer that EMoE converts; put LoRA on the "
                            "attention layers only (the paper's setting), e.g. target_modules=['query', 'value']")


# --- BERT family (BERT, RoBERTa, all-MiniLM): FFN split over layer.intermediate and layer.output ---
class BertFFN(EMoEMixin):
    def feed_forward_chunk(self, attention_output):
        inter, out = self.intermediate, self.output
        check_no_lora(inter.dense, out.dense)
        w = inter.dense.weight
        y = self.emoe_ffn(attention_output, w, inter.dense.bias, out.dense.weight, inter.intermediate_act_fn, key=w)
        if out.dense.bias is not None:
            y = y + out.dense.bias  # b2 added once (the official Tutel path splits it k ways)
        return out.LayerNorm(out.dropout(y) + attention_output)


def _bert_permuted(h):
    return [(h.intermediate.dense.weight, 0), (h.intermediate.dense.bias, 0), (h.output.dense.weight, 1)]


# --- GPT-2: Conv1D stores weights as (in, out), so keys are c_fc.weight transposed ---
class GPT2FFN(EMoEMixin):
    def forward(self, hidden_states):
        check_no_lora(self.c_fc, self.c_proj)
        w_in = self.c_fc.weight.t()
        y = self.emoe_ffn(hidden_states, w_in, self.c_fc.bias, self.c_proj.weight.t(), self.act, key=w_in)
        return self.dropout(y + self.c_proj.bias)


# --- ViT (transformers >= 5: ViTMLP with fc1/fc2) ---
class ViTFFN(EMoEMixin):
    def forward(self, hidden_states):
        check_no_lora(self.fc1, self.fc2)
        w = self.fc1.weight
        y = self.emoe_ffn(hidden_states, w, self.fc1.bias, self.fc2.weight, self.activation_fn, key=w)
        return y if self.fc2.bias is None else y + self.fc2.bias


# --- gated FFNs (Llama, Qwen2, Mistral): down(act(gate x) * up x); keys = gate_proj rows ---
class GatedFFN(EMoEMixin):
    def forward(self, x):
        check_no_lora(self.gate_proj, self.up_proj, self.down_proj)
        key = self.gate_proj.weight if self.emoe_state.cfg.cluster_source == "gate" else self.up_proj.weight
        y = self.emoe_ffn(x, self.up_proj.weight, self.up_proj.bias, self.down_proj.weight, self.act_fn, key=key,
                          w_glu_gate=self.gate_proj.weight)
        return y if self.down_proj.bias is None else y + self.down_proj.bias


def _gated_key(h, cfg):
    return h.gate_proj.weight if cfg.cluster_source == "gate" else h.up_proj.weight


def _gated_check(h):
    if h.gate_proj.bias is not None:
        raise UserError("gated FFN with a gate_proj bias is not supported by EMoE (expert_ffn has no gate bias)")


register_adapter(Adapter("bert", ("BertLayer", "RobertaLayer"), lambda h, cfg: h.intermediate.dense.weight,
                         _bert_permuted, BertFFN))
register_adapter(Adapter("gpt2", ("GPT2MLP",), lambda h, cfg: h.c_fc.weight.t(),
                         lambda h: [(h.c_fc.weight, 1), (h.c_fc.bias, 0), (h.c_proj.weight, 0)], GPT2FFN))
register_adapter(Adapter("vit", ("ViTMLP",), lambda h, cfg: h.fc1.weight,
                         lambda h: [(h.fc1.weight, 0), (h.fc1.bias, 0), (h.fc2.weight, 1)], ViTFFN))
register_adapter(Adapter("gated", ("LlamaMLP", "Qwen2MLP", "MistralMLP"), _gated_key,
                         lambda h: [(h.gate_proj.weight, 0), (h.gate_proj.bias, 0), (h.up_proj.weight, 0),
                                    (h.up_proj.bias, 0), (h.down_proj.weight, 1)], GatedFFN, _gated_check))
