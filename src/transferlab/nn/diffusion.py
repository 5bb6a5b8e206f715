"""DDPM training (epsilon prediction) and a deterministic DDIM sampler, for any `model(x, t, y) -> eps`.

    diff = Diffusion(timesteps=1000, schedule="linear")
    loss = diff.loss(model, x0, y)                       # one DDPM training loss
    x = diff.ddim_sample(model, y, shape=(1, 28, 28), steps=50, cfg_scale=1.5, null_label=10)
    train_diffusion(model, diff, x, y, steps=..., ...)   # the loop, with resumable checkpoints

References: Ho et al. 2020 (DDPM, eq. 14 "simple" loss), Song et al. 2021 (DDIM, eq. 12 with eta=0),
Nichol & Dhariwal 2021 (cosine schedule), Ho & Salimans 2022 (classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .train import batches


class Diffusion:
    """The forward noising process q(x_t | x_0) for a beta schedule of `timesteps` steps."""

    def __init__(self, timesteps: int = 1000, schedule: str = "linear"):
        if timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, got {timesteps}")
        if schedule == "linear":  # DDPM/DiT: betas from 1e-4 to 0.02 at T=1000, rescaled for other T
            scale = 1000 / timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        elif schedule == "cosine":
            s = 0.008
            f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2)
            abar = f**2 / f[0] ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.timesteps = timesteps
        self.alpha_bar = torch.cumprod(1 - betas, dim=0).float()

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar.to(t.device)[t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._abar(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error between the true and predicted noise at random (or given) timesteps."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y), noise)

    @torch.no_grad()
    def ddim_sample(self, model, y: torch.Tensor, shape: tuple[int, ...], steps: int = 50,
                    cfg_scale: float = 1.0, null_label: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta=0) samples for labels `y`; returns images clipped to [-1, 1].

        With `cfg_scale != 1` the conditional and unconditional (null-label) predictions are mixed:
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond).
        """
        if cfg_scale != 1.0 and null_label is None:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs null_label")
        device = y.device
        x = torch.randn((len(y), *shape), generator=generator, device="cpu" if generator is None else
                        generator.device).to(device)
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        abar = self.alpha_bar.to(device)
        for i, t in enumerate(ts):
            tt = torch.full((len(y),), t, device=device, dtype=torch.long)
            if cfg_scale != 1.0:
                both = model(torch.cat([x, x]), torch.cat([tt, tt]),
                             torch.cat([y, torch.full_like(y, null_label)]))
                cond, unc = both.chunk(2)
                eps = unc + cfg_scale * (cond - unc)
            else:
                eps = model(x, tt, y)
            a = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # re-derive eps so it is consistent with the clip
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1, 1)


def train_diffusion(model, diffusion: Diffusion, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                    batch_size: int, optimizer: torch.optim.Optimizer, seed: int, engine=None,
                    class_dropout: float = 0.0, null_label: int | None = None, phase: str = "train",
                    checkpoint_every: int = 0, extra_state: Callable[[], dict] | None = None,
                    grad_clip: float | None = 1.0, desc: str = "diffusion") -> list[float]:
    """`steps` optimiser steps of the DDPM loss on (x, y); returns the loss per step.

    Data order is a pure function of (seed, epoch) and all randomness is restored from the engine's
    checkpoint, so a killed run resumed from its last checkpoint takes exactly the same steps.
    Label dropout (for classifier-free guidance) is applied here, before the model sees the label.
    """
    if class_dropout > 0 and null_label is None:
        raise ValueError("class_dropout > 0 needs null_label")
    device = x.device
    start, losses = 0, []
    if engine is not None:
        ckpt = engine.load_checkpoint()
        if ckpt is not None and ckpt.get("phase") == phase:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["opt"])
            start, losses = ckpt["step"], list(ckpt["losses"])
    per_epoch = max(1, len(x) // batch_size)
    bar = range(start, steps) if engine is None else engine.progress(range(start, steps), desc=desc)
    chunks, chunk_epoch = None, -1
    model.train()
    for step in bar:
        epoch = step // per_epoch
        if epoch != chunk_epoch:
            chunks = batches(len(x), batch_size, seed=seed * 100_003 + epoch, drop_last=len(x) >= batch_size)
            chunk_epoch = epoch
        b = chunks[(step % per_epoch) % len(chunks)].to(device)
        yb = y[b]
        if class_dropout > 0:
            drop = torch.rand(yb.shape, device=device) < class_dropout
            yb = torch.where(drop, torch.full_like(yb, null_label), yb)
        loss = diffusion.loss(model, x[b], yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if engine is not None and checkpoint_every and (done % checkpoint_every == 0) and done < steps:
            state = {"phase": phase, "step": done, "losses": losses, "model": model.state_dict(),
                     "opt": optimizer.state_dict()}
            if extra_state is not None:
                state.update(extra_state())
            engine.save_checkpoint(state)
    model.eval()
    return losses


def flops_per_forward(model, *args) -> float:
    """Floating-point operations (multiply-add = 2) of one `model(*args)` call, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return float(counter.get_total_flops())
