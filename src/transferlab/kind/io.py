"""Saving and loading KIND models (JSON config + safetensors weights) and learngenes alone.

    save_pretrained(model, "out")            # transferlab_config.json + model.safetensors
    model = from_pretrained("out", DiT(...))  # the same base architecture, converted and loaded
    save_learngenes(model, "genes.safetensors"); load_learngenes(other, "genes.safetensors")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.io import atomic_write_bytes
from ..core.pretrained import dedupe, read_pretrained_config, read_safetensors, read_weights, write_pretrained
from .config import KindConfig
from .layer import LEARNGENE_PARAMS, TAILOR_PARAMS
from .model import TRAINABLE_GROUPS, _gate, convert, kind_layers, reset_class_embedders

LEARNGENE_FORMAT = "transferlab.kind.learngenes/2"


def current_config(model: nn.Module) -> tuple[KindConfig, int]:
    """(KindConfig, number of gate classes) describing the model as it is now (after any `transfer`)."""
    gate = _gate(model)
    layers = kind_layers(model)
    if not layers:
        raise UserError("the model has no KIND layers (merged?); save it before transferlab.kind.merge")
    if getattr(gate, "config", None) is None:
        raise UserError("this model's class gate was not made by transferlab.kind.convert; nothing to save")
    first = next(iter(layers.values()))
    st = gate.settings
    cfg = KindConfig.from_dict({**gate.config, "n_learngene": first.n_learngene, "n_tailor": first.n_tailor,
                                "compute": first.compute, "allow_overcomplete": first.allow_overcomplete,
                                "k_active": st["k_active"], "assignment": st["assignment"], "gate_seed": st["seed"],
                                "gate": st["gate"], "null_class": st["null_class"]})
    return cfg, gate.num_classes


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write a KIND model to `directory`: transferlab_config.json = {"method": "kind", "version": 1,
    "config": KindConfig.to_dict(), "num_classes": gate classes} and its state_dict as model.safetensors."""

    gate = _gate(model)
    if gate.merged_class is not None:
        raise UserError("this model was merged for one class; save the unmerged model (merge after loading)")
    cfg, num_classes = current_config(model)
    return write_pretrained(directory, "kind", model.state_dict(),
                            {"config": cfg.to_dict(), "num_classes": num_classes})


def read_config(directory) -> tuple[KindConfig, int]:
    """(config, number of gate classes) stored by `save_pretrained` in `directory`."""
    blob = read_pretrained_config(directory, "kind")
    return KindConfig.from_dict(blob["config"]), int(blob["num_classes"])


@torch.no_grad()
def from_pretrained(directory, model: nn.Module) -> nn.Module:
    """Convert `model` (the dense base architecture) with the saved config and load the saved weights
    (strict). The class embedders are resized to the saved number of classes first. In place; returns it."""
    cfg, num_classes = read_config(directory)
    state = read_weights(directory, "kind")
    if hasattr(model, "kind_gate"):
        raise UserError("from_pretrained needs the dense base model, not one already converted to KIND")
    with torch.random.fork_rng(devices=[]):  # fresh factors are overwritten: leave the RNG as it was
        reset_class_embedders(model, num_classes)
        # random factors, not an SVD of the base weights: every factor is loaded next
        convert(model, dataclasses.replace(cfg, init="random"), num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    return model


# ---- learngenes alone ------------------------------------------------------------------------------
def extract_learngenes(model: nn.Module, include_dense: bool = False) -> dict[str, torch.Tensor]:
    """Flat tensors `<layer>.U_g/s_g/V_g` of every KIND layer, plus (`include_dense`) every class-agnostic
    dense parameter under `dense.<name>` (embedders, adaLN, final layer, biases; label embeddings never)."""
    layers = kind_layers(model)
    if not layers:
        raise UserError("the model has no KIND layers; nothing to save")
    out = {f"{n}.{k}": getattr(m, k).detach().cpu().clone() for n, m in layers.items() for k in LEARNGENE_PARAMS}
    if include_dense:
        skip = TRAINABLE_GROUPS["label_embed"]
        factors = {f"{n}.{p}" for n in layers for p in LEARNGENE_PARAMS + TAILOR_PARAMS}
        out.update({f"dense.{n}": p.detach().cpu().clone() for n, p in model.named_parameters()
                    if n not in factors and not any(s in n for s in skip)})
    return out


def save_learngenes(model: nn.Module, path, include_dense: bool = False) -> Path:
    """Write `extract_learngenes(model, include_dense)` to a safetensors file (atomically)."""
    from safetensors.torch import save as st_save

    tensors, _ = dedupe(extract_learngenes(model, include_dense))
    return atomic_write_bytes(Path(path), st_save(tensors, metadata={"format": LEARNGENE_FORMAT}))


@torch.no_grad()
def load_learngenes(model: nn.Module, genes: dict[str, torch.Tensor] | str | Path) -> nn.Module:
    """Copy saved learngenes (a file from `save_learngenes` or a dict from `extract_learngenes`) into a
    converted model with the same layer names and shapes. Everything is checked before anything is
    copied, so a mismatch leaves the model untouched."""
    if not isinstance(genes, dict):
        f = Path(genes)
        if not f.exists():
            raise UserError(f"learngene file {str(f)!r} does not exist")
        genes, meta = read_safetensors(f)
        if meta.get("format") != LEARNGENE_FORMAT:
            raise UserError(f"{f} is not a learngene file (expected format {LEARNGENE_FORMAT}); write it with "
                            "transferlab.kind.save_learngenes")
    layers = kind_layers(model)
    saved = {k.rsplit(".", 1)[0] for k in genes if not k.startswith("dense.")}
    if set(layers) != saved:
        missing, extra = sorted(saved - set(layers)), sorted(set(layers) - saved)
        raise UserError(f"learngene layers do not match the model: missing in model {missing[:3]}, "
                        f"not in file {extra[:3]}; convert the same architecture with the same KindConfig.targets")
    for n, m in layers.items():
        U, V = genes[f"{n}.U_g"], genes[f"{n}.V_g"]
        s_in, s_out, s_g = V.shape[0], U.shape[0], U.shape[1]
        if (s_in, s_out, s_g) != (m.in_features, m.out_features, m.n_learngene):
            raise UserError(f"layer {n}: saved learngenes are {s_in}->{s_out} with {s_g} components, the model "
                            f"has {m.in_features}->{m.out_features} with {m.n_learngene}; build the model with "
                            "the same width and KindConfig.n_learngene")
    params = dict(model.named_parameters())
    dense = {k[len("dense."):]: v for k, v in genes.items() if k.startswith("dense.")}
    for n, t in dense.items():
        if n not in params or params[n].shape != t.shape:
            raise UserError(f"dense parameter {n} from the learngene file does not fit the model "
                            f"({tuple(t.shape)} vs {tuple(params[n].shape) if n in params else 'absent'})")
    for n, m in layers.items():
        for k in LEARNGENE_PARAMS:
            getattr(m, k).copy_(genes[f"{n}.{k}"])
    for n, t in dense.items():
        params[n].copy_(t)
    return model
