"""The folder format shared by the model-surgery methods' `save_pretrained` / `from_pretrained`.

    <directory>/transferlab_config.json   {"method": "emoe" | "kind", "version": 1, "config": {...}, ...}
    <directory>/model.safetensors         the weights; tied tensors stored once, aliases in the metadata

A method writes its own config and extra fields; this module writes and checks the envelope.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_json

CONFIG_FILE = "transferlab_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_NAMES = {"emoe": "EMoE", "kind": "KIND"}


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors with shared storage (tied weights) stored once: (tensors, alias -> stored name)."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in state.items():
        v = v.detach()
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if v.numel() and ident in seen:
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        tensors[k] = v.contiguous().cpu()
    return tensors, aliases


def read_safetensors(file) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with their aliases restored, metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(file)
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
    state.update({k: state[v] for k, v in json.loads(meta.get("aliases", "{}")).items()})
    return state, meta


def write_pretrained(directory, method: str, state: dict[str, torch.Tensor], blob: dict) -> Path:
    """Write `state` (tensors) and {"method", "version", **blob} into `directory`; returns it."""
    from safetensors.torch import save as st_save

    tensors, aliases = dedupe(state)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, st_save(tensors, metadata={"aliases": json.dumps(aliases)}))
    atomic_write_json(path / CONFIG_FILE, {"method": method, "version": FORMAT_VERSION, **blob})
    return path


def read_pretrained_config(directory, method: str) -> dict:
    """The config blob of a folder written by `write_pretrained` for `method`, with one-line errors."""
    f = Path(directory) / CONFIG_FILE
    if not f.exists():
        raise UserError(f"{f} not found: this folder was not written by transferlab.{method}.save_pretrained")
    blob = json.loads(f.read_text())
    if blob.get("method") != method:
        raise UserError(f"{f} holds a {blob.get('method')!r} model, not {_NAMES.get(method, method)}: load it with "
                        f"transferlab.{blob.get('method')}.from_pretrained")
    if blob.get("version") != FORMAT_VERSION:
        raise UserError(f"{f} has format version {blob.get('version')!r}; this transferlab reads version "
                        f"{FORMAT_VERSION}: upgrade transferlab")
    return blob


def read_weights(directory, method: str) -> dict[str, torch.Tensor]:
    """The tensors of `directory`'s model.safetensors, tied aliases restored."""
    file = Path(directory) / WEIGHTS_FILE
    if not file.exists():
        raise UserError(f"{file} not found: the folder is incomplete; save it again with "
                        f"transferlab.{method}.save_pretrained")
    return read_safetensors(file)[0]
