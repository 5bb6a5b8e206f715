"""convert / revert / save / load: turn a model's dense FFNs into emergent experts and back.

convert() is function-preserving up to routing: it permutes each chosen FFN's neurons so every
expert is a contiguous block (rows of W_in and b_in, columns of W_out; gated FFNs: gate/up rows and
down columns with one index), then swaps the host module's class for its EMoE subclass. With
top_k == num_experts the converted model computes the dense function. revert() un-permutes and
restores the class, so revert(convert(m)) gives back the state_dict bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.pretrained import WEIGHTS_FILE, read_pretrained_config, read_weights, write_pretrained
from .adapters import adapter_for, check_no_lora, emoe_class, refusal_for, supported_architectures
from .cluster import split_permutation
from .config import EMoEConfig
from .layer import CosineRouter, EMoEState


def ffn_hosts(model: nn.Module) -> list[nn.Module]:
    """Every module that hosts one supported FFN, in module order (converted or not)."""
    return [m for m in model.modules() if hasattr(m, "emoe_state") or adapter_for(m) is not None]


def emoe_layers(model: nn.Module) -> list[nn.Module]:
    """The converted FFN hosts (each has `.emoe_state`)."""
    return [m for m in model.modules() if hasattr(m, "emoe_state")]


def is_converted(model: nn.Module) -> bool:
    return bool(emoe_layers(model))


def _unsupported(model: nn.Module) -> UserError:
    archs = "; ".join(f"{name} ({', '.join(cls)})" for name, cls in supported_architectures().items())
    return UserError(f"EMoE found no supported FFN in {type(model).__name__}. Supported architectures: {archs}. "
                     "For another model, register an adapter: transferlab.emoe.register_adapter(Adapter(name, "
                     "host_classes=('MyBlock',), key=..., permuted=..., mixin=...)); see docs/emoe.md")


def _resolve_layers(layers, count: int) -> list[int]:
    if layers == "all":
        return list(range(count))
    out = []
    for i in layers:
        j = i + count if i < 0 else i
        if not 0 <= j < count:
            raise UserError(f"EMoE layer index {i} is out of range: the model has {count} FFN layers "
                            f"(valid: 0..{count - 1} or -{count}..-1)")
        if j in out:
            raise UserError(f"EMoE layer {i} is listed twice in layers={tuple(layers)}")
        out.append(j)
    return sorted(out)


def _permute(params: list[tuple[nn.Parameter | None, int]], perm: torch.Tensor) -> None:
    with torch.no_grad():
        for p, axis in params:
            if p is not None:
                p.data = p.data.index_select(axis, perm.to(p.device))


def convert(model: nn.Module, config: EMoEConfig | None = None, *, permutations: dict | None = None) -> nn.Module:
    """Convert the chosen dense FFNs of `model` into EMoE layers, in place; returns `model`.

    permutations: optional {layer index: neuron order} (e.g. from `read_saved`) used instead of
    clustering. Create the optimizer after convert (the FFN tensors are re-laid-out).
    """
    config = config or EMoEConfig()
    if not isinstance(config, EMoEConfig):
        raise UserError(f"convert() needs an EMoEConfig, got {type(config).__name__}")
    if is_converted(model):
        raise UserError("this model is already EMoE-converted; call transferlab.emoe.revert(model) first "
                        "to convert it again with other settings")
    why = refusal_for(model)
    if why is not None:
        raise UserError(why)
    hosts = ffn_hosts(model)
    if not hosts:
        raise _unsupported(model)
    chosen = _resolve_layers(config.layers, len(hosts))
    # validate everything and compute every permutation before touching the model: a failure
    # leaves the model exactly as it was
    plans = []
    for i in chosen:
        host = hosts[i]
        adapter = adapter_for(host)
        if adapter.check is not None:
            adapter.check(host)
        params = adapter.permuted(host)
        ffn_params = {id(p) for p, _ in params if p is not None}
        check_no_lora(*[m for m in host.modules() if hasattr(m, "base_layer")
                        and id(getattr(m.base_layer, "weight", None)) in ffn_params])
        key = adapter.key(host, config)
        d_ff = key.shape[0]
        if d_ff % config.num_experts:
            raise UserError(f"num_experts={config.num_experts} must divide the FFN width d_ff={d_ff} "
                            f"(layer {i}); try one of {[d for d in (4, 8, 12, 16, 24, 32, 48, 64) if d_ff % d == 0]}")
        if permutations is not None:
            if i not in permutations and str(i) not in permutations:
                raise UserError(f"permutations has no entry for layer {i}")
            perm = torch.as_tensor(permutations[i] if i in permutations else permutations[str(i)], dtype=torch.long)
            if perm.shape != (d_ff,) or not torch.equal(torch.sort(perm).values, torch.arange(d_ff)):
                raise UserError(f"stored permutation for layer {i} is not a permutation of {d_ff} neurons")
        else:
            perm = split_permutation(key, config.num_experts, config.split, config.seed + i,
                                     config.kmeans_n_init, config.kmeans_max_iter)
        plans.append((i, host, adapter, params, perm))
    for i, host, adapter, params, perm in plans:
        _permute(params, perm)
        original = type(host)
        host.__class__ = emoe_class(original, adapter.mixin)
        host.emoe_state = EMoEState(config, i, adapter.name, perm.cpu(), original)
        if config.gate == "learned":
            key = adapter.key(host, config)  # random init from the global RNG (seed it for reproducibility)
            host.emoe_router = CosineRouter(key.shape[1], config.num_experts).to(key.device)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo convert() in place: un-permute the neurons and restore the dense classes; returns `model`."""
    layers = emoe_layers(model)
    if not layers:
        raise UserError("revert() was given a model with no EMoE layers (it is already dense); "
                        "call transferlab.emoe.convert(model, config) first")
    for host in layers:
        st = host.emoe_state
        host.__class__ = st.original_class
        adapter = adapter_for(host)
        _permute(adapter.permuted(host), torch.argsort(st.perm))
        host._modules.pop("emoe_router", None)
        del host.emoe_state
    return model


def emoe_config(model: nn.Module) -> tuple[EMoEConfig, dict[int, list[int]]]:
    """The config and per-layer neuron orders of a converted model (what save_pretrained stores)."""
    layers = emoe_layers(model)
    if not layers:
        raise UserError("this model has no EMoE layers; convert it first")
    return layers[0].emoe_state.cfg, {h.emoe_state.index: h.emoe_state.perm.tolist() for h in layers}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted Tutel balance loss of the last training forward (0 when aux_loss_weight is 0)."""
    total = None
    for h in emoe_layers(model):
        st = h.emoe_state
        if st.aux_loss is not None and st.cfg.aux_loss_weight > 0:
            term = st.cfg.aux_loss_weight * st.aux_loss
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def expert_load(model: nn.Module, reset: bool = False, track: bool | None = None) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert per converted layer (turn counting on with track=True)."""
    out = {}
    for h in emoe_layers(model):
        st = h.emoe_state
        if track is not None:
            st.track_load = track
        out[st.index] = st.load.clone()
        if reset:
            st.load.zero_()
    return out


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write a converted model to `directory`: transferlab_config.json + model.safetensors.

    transferlab_config.json = {"method": "emoe", "version": 1, "config": EMoEConfig.to_dict(),
    "permutations": {layer: neuron order}}. model.safetensors holds the state_dict in the *dense* neuron
    order, plus the learned router's tensors under
    `<host>.emoe_router.*` for EMoE-learn: every other tensor is exactly the dense model's, so the file
    also serves the paper's EMoE2Dense path. Tensors are made contiguous; tied tensors are stored once
    (the aliases are listed in the file's metadata).
    """
    cfg, perms = emoe_config(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for h in emoe_layers(model):  # un-permute the FFN tensors: the file holds the dense neuron order
        inverse = torch.argsort(h.emoe_state.perm)
        for p, axis in adapter_for(h).permuted(h):
            if p is not None:
                state[names[id(p)]] = p.detach().index_select(axis, inverse.to(p.device))
    return write_pretrained(directory, "emoe", state, {"config": cfg.to_dict(),
                                                        "permutations": {str(k): v for k, v in perms.items()}})


def read_saved(directory) -> tuple[EMoEConfig, dict[int, list[int]]]:
    """(config, permutations) stored by save_pretrained in `directory`."""
    blob = read_pretrained_config(directory, "emoe")
    return EMoEConfig.from_dict(blob["config"]), {int(k): v for k, v in blob["permutations"].items()}


def from_pretrained(directory, model: nn.Module) -> nn.Module:
    """Load what save_pretrained wrote into `model` (the dense base model): weights (strict), then convert
    with the stored config and neuron orders. In place; returns `model`."""
    cfg, perms = read_saved(directory)
    state = read_weights(directory, "emoe")
    if is_converted(model):
        raise UserError("from_pretrained needs the dense base model; call transferlab.emoe.revert(model) first")
    router = {k: v for k, v in state.items() if ".emoe_router." in k or k.startswith("emoe_router.")}
    dense = {k: v for k, v in state.items() if k not in router}
    model.load_state_dict(dense, strict=True)
    with torch.random.fork_rng(devices=[]):  # the router's random init is overwritten: leave the RNG as it was
        convert(model, cfg, permutations=perms)
    expected = {k for k in model.state_dict() if ".emoe_router." in k or k.startswith("emoe_router.")}
    if set(router) != expected:
        revert(model)
        raise UserError(f"{Path(directory) / WEIGHTS_FILE}: router tensors {sorted(router)} do not match the "
                        f"config's {sorted(expected)}; the file belongs to another model or config")
    model.load_state_dict({**model.state_dict(), **router}, strict=True)
    return model
