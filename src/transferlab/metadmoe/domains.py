"""Domain families built from Fashion-MNIST: rotations (DomainBed's RotatedMNIST protocol), corruptions,
and a mixed family whose domains differ in kind (rotation, noise, blur, inversion, colour tint).

Every domain gets its own disjoint shard of images (as DomainBed's `MultipleEnvironmentMNIST`), so
no image appears in two domains. Corruption severities are drawn per image from a generator that
never sees the label, so the severity cannot leak the class. Each family also has three
*validation domains* (e.g. rotations 7.5/37.5/67.5 deg) that are never test folds and never sources:
hyperparameters of every method are chosen on them, as on the official OOD validation split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..data import load_fashion_mnist

ROTATIONS = (0, 15, 30, 45, 60, 75)
CORRUPTIONS = ("clean", "noise", "blur", "contrast", "inversion", "tint")
MIXED = ("clean", "rot60", "noise", "blur", "inversion", "tint")
FAMILIES = {"rotated": ROTATIONS, "corrupted": CORRUPTIONS, "mixed": MIXED}
# validation domains: of the family's kind, never a source and never a test fold
VAL_DOMAINS = {"rotated": (7.5, 37.5, 67.5), "corrupted": ("speckle", "pixelate", "brightness"),
               "mixed": ("rot30", "speckle", "pixelate")}


def rotate(x: torch.Tensor, degrees: float, mode: str = "bilinear") -> torch.Tensor:
    """Rotate [N, C, H, W] images counter-clockwise about their centre (zero fill).

    `mode="bilinear"` (DomainBed) also blurs every rotated domain but not 0 deg, which on Fashion-MNIST's
    fine textures is a shift of its own; "nearest" moves pixels without blurring them.
    """
    if mode not in ("bilinear", "nearest"):
        raise UserError(f"rotation mode must be 'bilinear' or 'nearest', got {mode!r}")
    if degrees == 0:
        return x.clone()
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma per image (a grouped convolution, one kernel per image)."""
    k = 7
    r = torch.arange(k, dtype=x.dtype) - k // 2
    g1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    g1 = g1 / g1.sum(1, keepdim=True)
    kern = (g1[:, :, None] * g1[:, None, :])[:, None]  # [N, 1, k, k]
    n, c, h, w = x.shape
    out = F.conv2d(x.reshape(1, n * c, h, w), kern.repeat_interleave(c, 0), padding=k // 2, groups=n * c)
    return out.reshape(n, c, h, w)


def corrupt(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Corrupt [N, 1, H, W] images in [0, 1]; returns 3-channel images [N, 3, H, W] in [0, 1].

    All domains are 3-channel (grey images are replicated) so one network reads every domain; the
    colour tint scales each channel by its own random factor (a per-image colour cast).
    """
    n = len(x)
    if kind == "clean":
        out = x
    elif kind == "noise":
        out = (x + _uniform(n, 0.2, 0.5, g)[:, None, None, None] * torch.randn(x.shape, generator=g)).clamp(0, 1)
    elif kind == "blur":
        out = _blur(x, _uniform(n, 1.0, 2.0, g))
    elif kind == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        out = m + _uniform(n, 0.15, 0.35, g)[:, None, None, None] * (x - m)
    elif kind == "inversion":
        s = _uniform(n, 0.75, 1.0, g)[:, None, None, None]
        out = (1 - s) * x + s * (1 - x)
    elif kind == "tint":
        return x.expand(-1, 3, -1, -1) * _uniform(3 * n, 0.15, 1.0, g).view(n, 3, 1, 1)
    elif kind == "speckle":  # multiplicative noise (a validation domain)
        out = (x * (1 + _uniform(n, 0.4, 0.8, g)[:, None, None, None] * torch.randn(x.shape, generator=g))).clamp(0, 1)
    elif kind == "pixelate":  # 28 -> 14 or 9 -> 28, nearest (a validation domain)
        out = torch.stack([F.interpolate(F.interpolate(x[i:i + 1], size=int(s), mode="area"), size=x.shape[-2:],
                                         mode="nearest")[0] for i, s in enumerate(torch.randint(9, 15, (n,),
                                                                                                 generator=g))])
    elif kind == "brightness":  # additive shift towards white (a validation domain)
        out = (x + _uniform(n, 0.3, 0.6, g)[:, None, None, None]).clamp(0, 1)
    elif kind.startswith("rot"):  # mixed family: a rotation, 3-channel like the other domains
        out = rotate(x, float(kind[3:]))
    else:
        raise UserError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}, speckle, pixelate, "
                        "brightness or rot<degrees>")
    return out.expand(-1, 3, -1, -1).contiguous()


def shard_indices(seed: int, k: int, n_train_total: int, per_train: int, n_test_total: int, per_test: int):
    """k disjoint (train indices, test indices) shards of a seeded permutation (DomainBed environments)."""
    g = torch.Generator().manual_seed(seed)
    ptr, pte = torch.randperm(n_train_total, generator=g), torch.randperm(n_test_total, generator=g)
    return [(ptr[d * per_train: (d + 1) * per_train], pte[d * per_test: (d + 1) * per_test]) for d in range(k)]


def _family(family: str):
    if family not in FAMILIES:
        raise UserError(f"unknown domain family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _transform(family: str, name, x: torch.Tensor, g: torch.Generator, rotation_mode: str) -> torch.Tensor:
    return rotate(x, name, rotation_mode) if family == "rotated" else corrupt(x, name, g)


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
            return _transform(family, name, x, gd, rotation_mode), y_all[idx].clone()

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
        val.append((name, (_transform(family, name, xtr[idx].float().div(255).unsqueeze(1), g, rotation_mode),
                           ytr[idx].clone())))
    return names, out, val
