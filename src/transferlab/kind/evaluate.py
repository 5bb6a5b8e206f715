"""Evaluation for `kind-fmnist`: a Fashion-MNIST judge network, sampling, and the generative metrics.

The judge is a `SmallCNN` trained here on real Fashion-MNIST (all 10 classes). Its penultimate
features define "FMNIST-FID" (a Fréchet distance, not comparable with Inception FID) and the k-NN
precision/recall; its predictions give the class-conditional accuracy of generated samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import SmallCNN, batches
from ..nn.diffusion import Diffusion, flops_per_forward
from .metrics import frechet_distance, knn_precision_recall


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] judge space."""
    return (x.clamp(-1, 1) + 1) / 2


def train_judge(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device=None) -> SmallCNN:
    """SmallCNN on real images in [0, 1] (N, 1, 28, 28) with labels 0..9.

    Trained on `device` (default CPU), returned on the CPU (the metrics run there, in float64).
    """
    torch.manual_seed(seed + 4242)
    device = torch.device("cpu") if device is None else device
    model = SmallCNN(10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        for b in batches(len(x), 128, seed=seed * 1000 + epoch):
            loss = F.cross_entropy(model(x[b].to(device)), y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.cpu().eval()


def judge_from_state(state: dict) -> SmallCNN:
    """The judge network from `train_judge(...).state_dict()`, on the CPU in eval mode."""
    model = SmallCNN(10)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def judge_outputs(judge: SmallCNN, x01: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted labels) of images in [0, 1], computed on the CPU in float32."""
    feats, preds = [], []
    for b in torch.arange(len(x01)).split(batch):
        z = judge.features(x01[b].float().cpu())
        feats.append(z)
        preds.append(judge.head(z).argmax(1))
    return torch.cat(feats), torch.cat(preds)


@torch.no_grad()
def generate(model, diffusion: Diffusion, labels: torch.Tensor, *, steps: int, cfg_scale: float, null_label: int,
             seed: int, device, batch: int = 500) -> torch.Tensor:
    """DDIM samples for `labels` (model-space class ids), generated in chunks with a seeded generator."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    noise_seeds = torch.randint(0, 2**31 - 1, (len(labels),), generator=g)
    out = []
    for b in torch.arange(len(labels)).split(batch):
        gen = torch.Generator().manual_seed(int(noise_seeds[b[0]]))
        out.append(diffusion.ddim_sample(model, labels[b].to(device), (1, 28, 28), steps=steps,
                                         cfg_scale=cfg_scale, null_label=null_label, generator=gen).cpu())
    return torch.cat(out)


@torch.no_grad()
def heldout_mse(model, diffusion: Diffusion, x: torch.Tensor, y: torch.Tensor, device,
                timesteps=(50, 250, 500, 750)) -> float:
    """Denoising loss on held-out real images at fixed timesteps and fixed noise (cheap sampler-free check)."""
    model.eval()
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(x.shape, generator=g)
        tt = torch.full((len(x),), t, dtype=torch.long)
        for b in torch.arange(len(x)).split(500):
            xt = diffusion.q_sample(x[b], tt[b], noise[b])
            eps = model(xt.to(device), tt[b].to(device), y[b].to(device)).cpu()
            total += F.mse_loss(eps, noise[b], reduction="sum").item()
    return total / (len(timesteps) * x.numel())


def sample_metrics(judge: SmallCNN, fake01: torch.Tensor, fake_labels: torch.Tensor, real01: torch.Tensor,
                   k: int) -> dict:
    """FMNIST-FID, class-conditional accuracy and k-NN precision/recall of generated images.

    `fake_labels` are the original Fashion-MNIST class ids the samples were conditioned on.
    """
    f_fake, pred = judge_outputs(judge, fake01)
    f_real, _ = judge_outputs(judge, real01)
    p, r = knn_precision_recall(f_real, f_fake, k)
    return {"fmnist_fid": frechet_distance(f_real, f_fake),
            "class_acc": 100 * (pred == fake_labels).float().mean().item(),
            "precision": p, "recall": r}


def gflops_per_sample(model, device, label: int) -> float:
    """GFLOPs of one network forward for one image (one denoising step), as the model computes it."""
    x = torch.zeros(1, 1, 28, 28, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.full((1,), label, dtype=torch.long, device=device)
    return flops_per_forward(model, x, t, y) / 1e9
