"""Pure metric functions on feature matrices (N, D): Fréchet distance and k-NN precision/recall.

In `kind-fmnist` the features come from a small Fashion-MNIST classifier trained in the experiment,
so the Fréchet distance is reported as "FMNIST-FID" and never as FID: it is not comparable with
Inception-based numbers.
"""

from __future__ import annotations

import torch


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) of Gaussian fits (float64)."""
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need two (N, D) feature matrices with the same D, got {tuple(f1.shape)}, {tuple(f2.shape)}")
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fake samples inside some real sample's k-NN ball,
    recall = share of real samples inside some fake sample's k-NN ball."""
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k={k} must be between 1 and the smaller set size minus 1")
    real, fake = real.double(), fake.double()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)
