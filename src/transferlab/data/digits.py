"""scikit-learn's bundled 8x8 digits (1,797 images), optionally upsampled to 28x28."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import DataNotFoundError


def load_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] of shape (N, 1, size, size) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise DataNotFoundError("digits need scikit-learn: pip install scikit-learn") from None
    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.int64)
