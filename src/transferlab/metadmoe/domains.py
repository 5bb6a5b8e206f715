"""Domain families built from Fashion-MNIST: rotations (DomainBed's RotatedMNIST protocol), corruptions,
and a mixed family whose domains differ in kind (rotation, noise, blur, inversion, colour tint).

Every domain gets its own disjoint shard of images (as DomainBed's `MultipleEnvironmentMNIST`), so
no image appears in two domains. Corruption severities are drawn per image from a generator that
never sees the label, so the severity cannot leak the class. Each family also has three
*validation domains* (e.g. rotations 7.5/37.5/67.5 deg) that are never test folds and never sources:
hyperparameters of every method are chosen on them, as on the official OOD validation split.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError
from ..data import load_fashion_mnist
from ..data.image_ops import corrupt, domain_transform, rotate

ROTATIONS = (0, 15, 30, 45, 60, 75)
CORRUPTIONS = ("clean", "noise", "blur", "contrast", "inversion", "tint")
MIXED = ("clean", "rot60", "noise", "blur", "inversion", "tint")
FAMILIES = {"rotated": ROTATIONS, "corrupted": CORRUPTIONS, "mixed": MIXED}
# validation domains: of the family's kind, never a source and never a test fold
VAL_DOMAINS = {"rotated": (7.5, 37.5, 67.5), "corrupted": ("speckle", "pixelate", "brightness"),
               "mixed": ("rot30", "speckle", "pixelate")}


def shard_indices(seed: int, k: int, n_train_total: int, per_train: int, n_test_total: int, per_test: int):
    """k disjoint (train indices, test indices) shards of a seeded permutation (DomainBed environments)."""
    g = torch.Generator().manual_seed(seed)
    ptr, pte = torch.randperm(n_train_total, generator=g), torch.randperm(n_test_total, generator=g)
    return [(ptr[d * per_train: (d + 1) * per_train], pte[d * per_test: (d + 1) * per_test]) for d in range(k)]


def _family(family: str):
    if family not in FAMILIES:
        raise UserError(f"unknown domain family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family]


def make_domains(family: str, seed: int, n_train: int, n_val: int, n_test: int, data_path=None,
                 rotation_mode: str = "bilinear", n_valdom: int = 0):
    """Per domain: (train (x, y), val (x, y), test (x, y)), from disjoint shards of Fashion-MNIST.

    Train/val shards come from the Fashion-MNIST training split, test shards from its test split;
    the shard assignment and corruption severities depend on `seed` only. With `n_valdom > 0` it
    returns `(names, domains, val_domains)`: `val_domains` holds `(name, (x, y))` for each of the
    family's validation domains (`VAL_DOMAINS`), `n_valdom` images each, disjoint from all other shards.
    """
    names = _family(family)
    vnames = VAL_DOMAINS[family] if n_valdom > 0 else ()
    xtr, ytr = load_fashion_mnist("train", data_path)
    xte, yte = load_fashion_mnist("test", data_path)
    k = len(names)
    need = k * (n_train + n_val) + len(vnames) * n_valdom
    if need > len(xtr) or k * n_test > len(xte):
        raise UserError(f"{k} domains x (n_train + n_val = {n_train + n_val}) + validation domains need {need} "
                        f"training images and {k * n_test} test images; only {len(xtr)} / {len(xte)} available. "
                        "Lower n_train / n_val / n_valdom / n_test")
    shards = shard_indices(seed, k, len(xtr), n_train + n_val, len(xte), n_test)
    out = []
    for d, (name, (tr, te)) in enumerate(zip(names, shards)):
        gd = torch.Generator().manual_seed(seed * 1009 + d)

        def make(idx, x_all, y_all, name=name, gd=gd):
            x = x_all[idx].float().div(255).unsqueeze(1)
            return domain_transform(family, name, x, gd, rotation_mode), y_all[idx].clone()

        train, test = make(tr, xtr, ytr), make(te, xte, yte)
        out.append(((train[0][:n_train], train[1][:n_train]), (train[0][n_train:], train[1][n_train:]), test))
    if n_valdom <= 0:
        return names, out
    # the same seeded permutation as shard_indices; validation domains take the images after the k shards
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    start = k * (n_train + n_val)
    val = []
    for v, name in enumerate(vnames):
        idx = perm[start + v * n_valdom: start + (v + 1) * n_valdom]
        g = torch.Generator().manual_seed(seed * 1009 + 100 + v)
        val.append((name, (domain_transform(family, name, xtr[idx].float().div(255).unsqueeze(1), g, rotation_mode),
                           ytr[idx].clone())))
    return names, out, val


__all__ = ["FAMILIES", "VAL_DOMAINS", "corrupt", "make_domains", "rotate", "shard_indices"]
