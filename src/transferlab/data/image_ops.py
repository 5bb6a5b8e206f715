"""Image helpers the Fashion-MNIST experiments share: seeded class subsets and rotation.

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
