"""Image helpers the Fashion-MNIST experiments share: seeded class subsets, rotation and corruptions.

Kept free of torchvision: rotation is one `affine_grid` + `grid_sample`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import UserError


def per_class_indices(y: torch.Tensor, classes, n: int | None, g: torch.Generator, skip: int = 0,
                      shuffle: bool = False) -> torch.Tensor:
    """Indices of `n` examples of each class in `classes` (all when n is None), after skipping `skip`.

    Each class's indices are drawn in a seeded random order, so `skip` gives disjoint splits of one
    draw (e.g. `skip=shots` for a validation split after the training shots). With `shuffle` the
    concatenation is shuffled once more (otherwise it is grouped by class, in the order of `classes`).
    """
    out = []
    for c in classes:
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        if n is not None and len(idx) < skip + n:
            raise UserError(f"class {c} has only {len(idx)} images, fewer than the {skip + n} asked for; "
                            f"ask for fewer images per class")
        out.append(idx[skip:] if n is None else idx[skip: skip + n])
    idx = torch.cat(out)
    return idx[torch.randperm(len(idx), generator=g)] if shuffle else idx


def rotate(x: torch.Tensor, degrees: float, mode: str = "bilinear") -> torch.Tensor:
    """Rotate [N, C, H, W] images counter-clockwise about their centre, filling with zeros.

    `mode="bilinear"` (as DomainBed) also smooths every rotated image but not the unrotated ones,
    which on Fashion-MNIST's fine textures is a shift of its own; "nearest" moves pixels unblurred.
    """
    if mode not in ("bilinear", "nearest"):
        raise UserError(f"rotation mode must be 'bilinear' or 'nearest', got {mode!r}")
    if degrees == 0:
        return x.clone()
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


# corruptions `corrupt` knows; "rot<degrees>" (a 3-channel rotation) is accepted besides these
CORRUPTIONS = ("clean", "noise", "blur", "contrast", "inversion", "tint", "speckle", "pixelate", "brightness")


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

    Severities are drawn per image from `g` (which never sees a label). Every output is 3-channel
    (grey images are replicated) so one network reads every domain; "tint" scales each channel by
    its own random factor (a per-image colour cast). "rot<degrees>" rotates (bilinear) instead.
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
    elif kind == "speckle":  # multiplicative noise
        out = (x * (1 + _uniform(n, 0.4, 0.8, g)[:, None, None, None] * torch.randn(x.shape, generator=g))).clamp(0, 1)
    elif kind == "pixelate":  # 28 -> 9..14 (area) -> 28 (nearest)
        out = torch.stack([F.interpolate(F.interpolate(x[i:i + 1], size=int(s), mode="area"), size=x.shape[-2:],
                                         mode="nearest")[0] for i, s in enumerate(torch.randint(9, 15, (n,),
                                                                                                 generator=g))])
    elif kind == "brightness":  # additive shift towards white
        out = (x + _uniform(n, 0.3, 0.6, g)[:, None, None, None]).clamp(0, 1)
    elif kind.startswith("rot"):  # a rotation, 3-channel like the corruptions
        out = rotate(x, float(kind[3:]))
    else:
        raise UserError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)} or rot<degrees>")
    return out.expand(-1, 3, -1, -1).contiguous()


def domain_transform(family: str, name, x: torch.Tensor, g: torch.Generator, rotation_mode: str = "bilinear"
                     ) -> torch.Tensor:
    """One domain's images: `rotate(x, name)` for the 'rotated' family, else `corrupt(x, name, g)`."""
    return rotate(x, name, rotation_mode) if family == "rotated" else corrupt(x, name, g)
