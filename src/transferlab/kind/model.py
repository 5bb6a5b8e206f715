"""Model-level KIND: convert a DiT, pre-train, transfer to new classes, merge.

    model = convert(DiT(num_classes=6), KindConfig(n_learngene=48, n_tailor=48))
    fit(model, x, y, diffusion=Diffusion(), steps=2000, batch_size=128, lr=3e-4)   # KIND pre-training
    report = transfer(model, new_classes=4)      # learngenes frozen, new random tailors + labels trainable
    fit(model, x_new, y_new, diffusion=..., steps=500, batch_size=64, lr=3e-4)
    save_pretrained(model, "out"); merge(model, class_id=2)   # (transferlab.kind.io) dense for class 2
"""

from __future__ import annotations

import copy as _copy

import torch
from torch import nn

from ..core.errors import UserError
from .config import KindConfig
from .gate import ClassGate
from .layer import KindLinear, SplitQKV

# module-name suffix -> role, for transferlab/facebookresearch DiT (fused qkv) and diffusers DiT
SUFFIX_ROLES = {
    "attn.qkv": "qkv", "attn.proj": "o", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "ff.net.0.proj": "fc1", "ff.net.2": "fc2",
}
# name fragments of the dense parts that `transfer` can make trainable
TRAINABLE_GROUPS = {
    "label_embed": ("y_embed", "class_embedder"),
    "final_layer": ("final_layer", "proj_out"),
    "adaln": ("adaLN_modulation", "norm1.linear"),
    "time_embed": ("t_embed", "timestep_embedder"),
    "patch_embed": ("x_embed", "pos_embed.proj"),
}


def kind_layers(model: nn.Module) -> dict[str, KindLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KindLinear)}


def _gate(model: nn.Module) -> ClassGate:
    gate = getattr(model, "kind_gate", None)
    if not isinstance(gate, ClassGate):
        raise UserError(f"{type(model).__name__} is not a KIND model; call transferlab.kind.convert(model, cfg) first")
    return gate


def _num_classes(model: nn.Module) -> int:
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    cfg = getattr(model, "config", None)  # diffusers DiTTransformer2DModel
    n = getattr(cfg, "num_embeds_ada_norm", None) if cfg is not None else None
    if n is None:
        raise UserError(f"cannot tell how many classes {type(model).__name__} has; pass num_classes=")
    return int(n)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert(model: nn.Module, config: KindConfig | None = None, num_classes: int | None = None) -> nn.Module:
    """Replace the DiT's q, k, v, o, fc1, fc2 projections by `KindLinear` (in place; returns the model).

    A fused qkv (transferlab / facebookresearch DiT) is split into three layers; diffusers'
    `DiTTransformer2DModel` already has separate `to_q/to_k/to_v`. A `ClassGate` is added as
    `model.kind_gate` and hooked on the model's forward, which keeps its signature unchanged.
    """
    cfg = config or KindConfig()
    if isinstance(getattr(model, "kind_gate", None), ClassGate):
        raise UserError("this model is already converted to KIND")
    found = [(n, m, role) for n, m in model.named_modules() for suf, role in SUFFIX_ROLES.items()
             if isinstance(m, nn.Linear) and (n == suf or n.endswith("." + suf))]
    if not found:
        raise UserError(f"no DiT projections found in {type(model).__name__} (looked for module names ending "
                        f"in {', '.join(SUFFIX_ROLES)})")
    n_classes = _num_classes(model) if num_classes is None else num_classes
    gate = ClassGate(n_classes, cfg.n_tailor, cfg.k_active, cfg.assignment, cfg.gate_seed, cfg.gate,
                     cfg.null_class)

    def make(lin: nn.Linear) -> KindLinear:
        if cfg.init == "svd":
            k = KindLinear.from_linear(lin, cfg.n_learngene, cfg.n_tailor, cfg.allow_overcomplete, cfg.compute)
        else:
            k = KindLinear(lin.in_features, lin.out_features, cfg.n_learngene, cfg.n_tailor,
                           bias=lin.bias is not None, allow_overcomplete=cfg.allow_overcomplete,
                           compute=cfg.compute).to(lin.weight.device, lin.weight.dtype)
        k.ctx = gate.ctx
        return k

    # build everything first, then swap: a bad size raises before the model is half converted
    swaps = []
    for name, lin, role in found:
        if role == "qkv":
            parts = SplitQKV.split_linear(lin)
            new = SplitQKV(*(make(p) if r in cfg.targets else p for p, r in zip(parts, "qkv")))
        elif role in cfg.targets:
            new = make(lin)
        else:
            continue
        swaps.append((name, new))
    for name, new in swaps:
        _set_module(model, name, new)
    model.kind_gate = gate.to(next(model.parameters()).device)
    gate.config = cfg.to_dict()  # what `save_pretrained` records (kept up to date by `transfer`)
    gate.attach(model, cfg.label_arg)
    return model


def convert_dit_to_kind(model: nn.Module, config: KindConfig | None = None, num_classes: int | None = None):
    """Deprecated alias of `convert`."""
    import warnings

    warnings.warn("convert_dit_to_kind is deprecated; use transferlab.kind.convert", DeprecationWarning,
                  stacklevel=2)
    return convert(model, config, num_classes)


def kind_param_groups(model: nn.Module, lr: float, sigma_lr_mult: float = 1.0, weight_decay: float = 0.0):
    """AdamW groups: singular values get their own LR and no decay (SVDiff found sigma needs a larger LR).

    Singular values are what a module lists in `sigma_parameters()`: s_g, s_t of `KindLinear`, the
    spectral shift of the SVDiff baseline.
    """
    sigma_ids = {id(p) for m in model.modules() if hasattr(m, "sigma_parameters") for p in m.sigma_parameters()}
    sig, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (sig if id(p) in sigma_ids else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if sig:
        groups.append({"params": sig, "lr": lr * sigma_lr_mult, "weight_decay": 0.0})
    return groups


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, diffusion, steps: int, batch_size: int,
        lr: float, sigma_lr_mult: float = 1.0, weight_decay: float = 0.0, class_dropout: float = 0.1,
        seed: int = 0, engine=None, phase: str = "kind", checkpoint_every: int = 0) -> list[float]:
    """Train the trainable parameters of a (KIND or dense) DiT with the DDPM loss; returns per-step losses.

    KIND changes parameter structure and routing, not the loss (KIND v1 abstract), so pre-training and
    transfer are the same loop; `transfer` decides what is trainable.
    """
    from ..nn.diffusion import train_diffusion

    gate = getattr(model, "kind_gate", None)
    null = gate.num_classes if isinstance(gate, ClassGate) else _num_classes(model)
    opt = torch.optim.AdamW(kind_param_groups(model, lr, sigma_lr_mult, weight_decay))
    return train_diffusion(model, diffusion, x, y, steps=steps, batch_size=batch_size, optimizer=opt, seed=seed,
                           engine=engine, class_dropout=class_dropout, null_label=null, phase=phase,
                           checkpoint_every=checkpoint_every, desc=phase)


pretrain = fit


def _label_embedders(model: nn.Module) -> list[nn.Module]:
    """diffusers' `LabelEmbedding`s (one per transformer block's AdaLayerNormZero) and look-alikes:
    a module with an `embedding_table` nn.Embedding and an int `num_classes`."""
    return [m for m in model.modules() if isinstance(getattr(m, "embedding_table", None), nn.Embedding)
            and isinstance(getattr(m, "num_classes", None), int)]


@torch.no_grad()
def reset_class_embedders(model: nn.Module, num_classes: int) -> nn.Module:
    """New, randomly initialised label embeddings for `num_classes` classes (plus the null label), in place.

    transferlab's DiT has `reset_classes`; for diffusers' `DiTTransformer2DModel` every block's class
    embedder is resized (N(0, 0.02) rows, as DiT initialises them) and `config.num_embeds_ada_norm` updated,
    so the null label is `num_classes` everywhere.
    """
    if hasattr(model, "reset_classes"):
        model.reset_classes(num_classes)
        return model
    embedders = _label_embedders(model)
    if not embedders:
        raise UserError(f"{type(model).__name__} has no reset_classes() and no class embedder with an "
                        "embedding_table; resize its label embedder yourself before transfer")
    for m in embedders:
        old = m.embedding_table
        extra = old.num_embeddings - m.num_classes  # 1 when the embedder has a null (CFG) row
        m.embedding_table = nn.Embedding(num_classes + extra, old.embedding_dim).to(old.weight.device,
                                                                                     old.weight.dtype)
        nn.init.normal_(m.embedding_table.weight, std=0.02)
        m.num_classes = num_classes
    if hasattr(model, "register_to_config") and "num_embeds_ada_norm" in getattr(model, "config", {}):
        model.register_to_config(num_embeds_ada_norm=num_classes)
    return model


def transfer(model: nn.Module, new_classes: int, *, n_tailor: int | None = None, k_active: int | None = None,
             train: tuple[str, ...] = ("label_embed", "final_layer"), train_bias: bool = False,
             tailor_init_scale: float = 1.0, gate: bool | None = None, learngenes: str = "first",
             generator: torch.Generator | None = None) -> dict:
    """Prepare a pre-trained KIND model for `new_classes` classes (in place).

    Learngenes are frozen; tailors are replaced by new random ones (trainable) and the gate is rebuilt
    for the new classes; label embeddings are re-initialised (models with `reset_classes`). Other
    dense parts are frozen except the groups named in `train` (keys of `TRAINABLE_GROUPS`: label_embed,
    final_layer, adaln, time_embed, patch_embed) [reconstructed: the
    paper does not say which dense parts are trained downstream]. `gate=None` keeps the pre-training
    gate setting (True routes the new tailors by class). `learngenes="first"` keeps the first
    n_learngene components (KIND's split); `"top_sigma"` first makes the n_learngene components of
    largest |s| the learngenes (for a model pre-trained without a gate, where the split is arbitrary).
    `tailor_init_scale` scales the new tailors' s (0 = the transfer starts at the learngene-only model).
    Returns a parameter report.
    """
    g = _gate(model)
    unknown = [t for t in train if t not in TRAINABLE_GROUPS]
    if unknown:
        raise UserError(f"unknown trainable group(s) {unknown}; choose from {', '.join(TRAINABLE_GROUPS)}")
    if new_classes < 1:
        raise UserError(f"new_classes must be at least 1, got {new_classes}")
    if learngenes not in ("first", "top_sigma"):
        raise UserError(f"learngenes must be 'first' or 'top_sigma', got {learngenes!r}")
    if tailor_init_scale < 0:
        raise UserError(f"tailor_init_scale must be >= 0, got {tailor_init_scale}")
    layers = kind_layers(model)
    for layer in layers.values():
        if learngenes == "top_sigma":
            layer.select_learngenes_by_sigma()
        layer.reset_tailors(n_tailor, scale=tailor_init_scale, generator=generator)
    g.reset(new_classes, n_tailor, k_active=k_active, gate=gate)
    reset_class_embedders(model, new_classes)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in layer.tailor_parameters():
            p.requires_grad_(True)
        if train_bias and layer.bias is not None:
            layer.bias.requires_grad_(True)
    frags = [f for t in train for f in TRAINABLE_GROUPS[t]]
    for n, p in model.named_parameters():
        if any(f in n for f in frags):
            p.requires_grad_(True)
    return kind_stats(model)


def kind_stats(model: nn.Module) -> dict:
    """Parameter counts by role; `tailor_formula` = sum over KIND matrices of n_tailor * (in + out + 1)."""
    layers = kind_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    learngene = sum(p.numel() for m in layers.values() for p in m.learngene_parameters())
    tailor = sum(p.numel() for m in layers.values() for p in m.tailor_parameters())
    formula = sum(m.n_tailor * (m.in_features + m.out_features + 1) for m in layers.values())
    return {"trainable": trainable, "frozen": total - trainable, "total": total, "learngene": learngene,
            "tailor": tailor, "tailor_formula": formula, "kind_layers": len(layers)}


@torch.no_grad()
def merge(model: nn.Module, class_id: int, *, copy: bool = False) -> nn.Module:
    """Materialise every KIND layer as a dense `nn.Linear` for class `class_id`, in place (returns the
    model; `copy=True` merges a deep copy and leaves `model` as it is).

    Inference is then exactly as fast as the dense DiT; the merged model accepts only label `class_id`
    (for guidance with the null label, sample with the unmerged model).
    """
    gate = _gate(model)
    mask = gate.mask(torch.tensor([class_id]))[0]
    merged = _copy.deepcopy(model) if copy else model
    for name, mod in list(merged.named_modules()):
        if isinstance(mod, SplitQKV):
            parts = [_dense(p, mask) for p in (mod.q, mod.k, mod.v)]
            fused = nn.Linear(parts[0].in_features, 3 * parts[0].out_features, bias=parts[0].bias is not None)
            fused = fused.to(parts[0].weight.device, parts[0].weight.dtype)
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
            _set_module(merged, name, fused)
    for name, mod in list(merged.named_modules()):
        if isinstance(mod, KindLinear):
            _set_module(merged, name, _dense(mod, mask))
    merged.kind_gate.merged_class = int(class_id)
    return merged.eval()


def _dense(layer: nn.Module, mask: torch.Tensor) -> nn.Linear:
    if not isinstance(layer, KindLinear):
        return layer
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    lin = lin.to(layer.U_g.device, layer.U_g.dtype)
    lin.weight.copy_(layer.dense_weight(mask))
    if layer.bias is not None:
        lin.bias.copy_(layer.bias)
    return lin
