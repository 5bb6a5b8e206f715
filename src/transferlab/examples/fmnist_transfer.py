"""`fmnist-transfer`: pre-train a small CNN on 5 Fashion-MNIST classes, transfer to the other 5 with few labels.

Arms: full fine-tuning, linear probing (frozen features, new head) and training from scratch.
The learning rate of each arm is chosen on a labelled validation split of the target classes,
never on the test set. The pre-trained network is shared by the arms of one seed (cached on
disk), so the arms are paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import field
from ..core.errors import UserError
from ..core.io import atomic_torch_save
from ..core.registry import register_experiment
from ..data import load_fashion_mnist
from ..nn import SmallCNN, batches, evaluate_classifier

ARMS = ("finetune", "linear_probe", "scratch")


@dataclass(frozen=True)
class FmnistTransferConfig:
    """Transfer between disjoint Fashion-MNIST class sets (a standard few-shot transfer check)."""

    arms: tuple[str, ...] = field(ARMS, "arms to run: finetune, linear_probe, scratch")
    seeds: int = field(3, "number of seeds")
    source_classes: tuple[int, ...] = field((0, 1, 2, 3, 4), "classes used for pre-training")
    target_classes: tuple[int, ...] = field((5, 6, 7, 8, 9), "classes of the transfer task")
    source_per_class: int = field(6000, "pre-training images per source class (max 6000)")
    pretrain_epochs: int = field(3, "pre-training epochs")
    shots: int = field(10, "labelled training images per target class")
    val_per_class: int = field(100, "labelled validation images per target class (for choosing the lr)")
    test_per_class: int = field(1000, "test images per target class (max 1000)")
    target_steps: int = field(100, "full-batch Adam steps on the target task")
    lrs: tuple[float, ...] = field((3e-3, 1e-3, 3e-4), "Adam learning rates tried; the best on validation is kept")
    batch_size: int = field(128, "pre-training batch size (per process)")
    width: int = field(32, "CNN width")
    data_path: str | None = field(None, "folder with the Fashion-MNIST IDX files (default: Debian package)")

    def __post_init__(self):
        if set(self.source_classes) & set(self.target_classes):
            raise UserError("source_classes and target_classes must not overlap")
        if self.shots < 1 or self.val_per_class < 1:
            raise UserError("shots and val_per_class must be at least 1")
        if not self.lrs:
            raise UserError("lrs must list at least one learning rate")


def _per_class(y: torch.Tensor, classes, n: int, g: torch.Generator, skip: int = 0) -> torch.Tensor:
    """Indices of n examples of each class (after skipping `skip`), in a seeded random order."""
    out = []
    for c in classes:
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) < skip + n:
            raise UserError(f"class {c} has only {len(idx)} images; lower shots/val_per_class/source_per_class")
        out.append(idx[skip: skip + n])
    return torch.cat(out)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255).unsqueeze(1)


def _relabel(y: torch.Tensor, classes) -> torch.Tensor:
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return lut[y]


def pretrain(cfg: FmnistTransferConfig, seed: int, engine) -> dict:
    """Pre-train on the source classes with per-epoch checkpoints; returns the state dict."""
    cache = engine.run_dir.parent / f"pretrained-seed{seed}.pt"
    if cache.exists():
        return torch.load(cache, map_location="cpu", weights_only=True)
    x, y = load_fashion_mnist("train", cfg.data_path)
    idx = _per_class(y, cfg.source_classes, cfg.source_per_class, torch.Generator().manual_seed(seed))
    xs, ys = _as_float(x[idx]), _relabel(y[idx], cfg.source_classes)
    torch.manual_seed(seed)
    model = SmallCNN(len(cfg.source_classes), width=cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = 0
    ckpt = engine.load_checkpoint()
    if ckpt is not None and ckpt.get("phase") == "pretrain":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["epoch"]
    model, opt = engine.prepare(model, opt)
    for epoch in range(start, cfg.pretrain_epochs):
        model.train()
        chunks = batches(len(xs), cfg.batch_size, seed=seed * 1000 + epoch,
                         rank=engine.process_index, world=engine.num_processes)
        for b in engine.progress(chunks, desc=f"pretrain epoch {epoch + 1}/{cfg.pretrain_epochs}"):
            loss = F.cross_entropy(model(xs[b].to(engine.device)), ys[b].to(engine.device))
            opt.zero_grad(set_to_none=True)
            engine.backward(loss)
            opt.step()
        engine.save_checkpoint({"phase": "pretrain", "epoch": epoch + 1,
                                "model": engine.unwrap(model).state_dict(), "opt": opt.state_dict()})
    state = {k: v.detach().cpu() for k, v in engine.unwrap(model).state_dict().items()}
    if engine.is_main:
        atomic_torch_save(state, cache)
    engine.wait()
    return state


def _train_target(arm: str, pre: dict | None, cfg, lr: float, seed: int, xtr, ytr) -> SmallCNN:
    torch.manual_seed(seed + 17)
    model = SmallCNN(len(cfg.source_classes), width=cfg.width)
    if pre is not None:
        model.load_state_dict(pre)
    model.classifier = torch.nn.Linear(model.feature_dim, len(cfg.target_classes))
    if arm == "linear_probe":
        for p in model.body.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(cfg.target_steps):
        # linear probing keeps BN statistics from pre-training: the features stay frozen
        model.train(arm != "linear_probe")
        loss = F.cross_entropy(model(xtr), ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@register_experiment(
    "fmnist-transfer", config=FmnistTransferConfig, reference="finetune",
    metrics=("test_acc", "val_acc"),
    description="Fashion-MNIST 5->5 class transfer with few labels: fine-tune vs linear probe vs scratch (CNN)",
    profiles={
        "quick": {"seeds": 2, "source_per_class": 1200, "pretrain_epochs": 2, "test_per_class": 500,
                  "target_steps": 60},
        "full": {"seeds": 5},
    },
)
def fmnist_transfer(cfg: FmnistTransferConfig, arm: str, seed: int, engine) -> dict:
    pre = None if arm == "scratch" else pretrain(cfg, seed, engine)
    x, y = load_fashion_mnist("train", cfg.data_path)
    xt, yt = load_fashion_mnist("test", cfg.data_path)
    g = torch.Generator().manual_seed(10_000 + seed)
    tr = _per_class(y, cfg.target_classes, cfg.shots, g)
    g = torch.Generator().manual_seed(10_000 + seed)  # same permutation: validation follows the shots
    va = _per_class(y, cfg.target_classes, cfg.val_per_class, g, skip=cfg.shots)
    te = _per_class(yt, cfg.target_classes, cfg.test_per_class, torch.Generator().manual_seed(0))
    xtr, ytr = _as_float(x[tr]), _relabel(y[tr], cfg.target_classes)
    xva, yva = _as_float(x[va]), _relabel(y[va], cfg.target_classes)
    xte, yte = _as_float(xt[te]), _relabel(yt[te], cfg.target_classes)
    best = None
    for lr in cfg.lrs:
        model = _train_target(arm, pre, cfg, lr, seed, xtr, ytr)
        val = evaluate_classifier(model, xva, yva)
        if best is None or val > best[0]:
            best = (val, lr, model)
    val, lr, model = best
    return {"test_acc": 100 * evaluate_classifier(model, xte, yte), "val_acc": 100 * val, "lr": lr}
