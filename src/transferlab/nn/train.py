"""Minimal, deterministic batching and evaluation shared by experiments."""

from __future__ import annotations

import torch


def batches(n: int, batch_size: int, *, seed: int | None = None, engine=None, drop_last: bool = False):
    """Index batches over range(n): shuffled with a private generator when `seed` is given.

    A private generator (not the global RNG) makes the order a pure function of (seed, epoch),
    so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
    With an engine of several processes each takes its share of the batches (data parallel).
    """
    if seed is None:
        order = torch.arange(n)
    else:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
    chunks = list(order.split(batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    return chunks if engine is None else engine.shard(chunks)  # equal step counts on every rank


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


@torch.no_grad()
def evaluate_classifier(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, engine=None,
                        transform=None) -> float:
    """Accuracy of `model` on (x, y); exact across processes when an engine is given."""
    was_training = model.training
    model.eval()
    device = engine.device if engine is not None else next(model.parameters()).device
    idx = torch.arange(len(x))
    if engine is not None:
        idx = torch.as_tensor(engine.shard(idx.tolist(), equal=False), dtype=torch.long)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for b in idx.split(batch_size):
        xb = x[b].to(device)
        if transform is not None:
            xb = transform(xb)
        correct += (model(xb).argmax(-1) == y[b].to(device)).sum()
    total = torch.tensor(len(idx), device=device)
    if engine is not None:
        correct, total = engine.reduce_sum(correct), engine.reduce_sum(total)
    model.train(was_training)
    return correct.item() / max(1, total.item())
