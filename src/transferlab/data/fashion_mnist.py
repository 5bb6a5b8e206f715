"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files parsed directly)."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .paths import find_source

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@lru_cache(maxsize=4)
def _load(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_file, lbl_file = _FILES[split]
    x = _read_idx(Path(root) / img_file, 16).reshape(-1, 28, 28)
    y = _read_idx(Path(root) / lbl_file, 8)
    if len(x) != len(y):
        raise ValueError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels in {root}")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def load_fashion_mnist(split: str = "train", path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,).

    Use `x.float().div(255).unsqueeze(1)` for a (N, 1, 28, 28) float batch.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_source("fashion-mnist", path, ["/usr/share/datasets/fashion-mnist"], list(_FILES[split]),
                       "install it with `apt-get install dataset-fashion-mnist` (or run ./run demo as root)")
    return _load(str(root), split)
