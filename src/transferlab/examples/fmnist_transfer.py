"""`fmnist-transfer`: pre-train a small CNN on 5 Fashion-MNIST classes, transfer to the other 5 with few labels.

Arms: full fine-tuning, linear probing (frozen features, new head) and training from scratch.
The learning rate of each arm is chosen on a labelled validation split of the target classes,
never on the test set. The pre-trained network is shared by the arms of one seed (`ctx.shared`),
so the arms are paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import field
from ..core.errors import UserError
from ..core.registry import register_experiment
from ..data import load_fashion_mnist
from ..data.image_ops import per_class_indices
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


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255).unsqueeze(1)


def _relabel(y: torch.Tensor, classes) -> torch.Tensor:
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return lut[y]


def pretrain(cfg: FmnistTransferConfig, seed: int, ctx) -> dict:
    """Pre-train on the source classes (data-parallel across processes, per-epoch checkpoints).

    Shared by every arm of one seed, so the arms are paired; returns the state dict."""
    return ctx.shared("pretrained", lambda: _pretrain(cfg, seed, ctx), collective=True)


def _pretrain(cfg: FmnistTransferConfig, seed: int, engine) -> dict:
    x, y = load_fashion_mnist("train", cfg.data_path)
    idx = per_class_indices(y, cfg.source_classes, cfg.source_per_class, torch.Generator().manual_seed(seed))
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
        chunks = batches(len(xs), cfg.batch_size, seed=seed * 1000 + epoch, engine=engine)
        for b in engine.progress(chunks, desc=f"pretrain epoch {epoch + 1}/{cfg.pretrain_epochs}"):
            loss = F.cross_entropy(model(xs[b].to(engine.device)), ys[b].to(engine.device))
            opt.zero_grad(set_to_none=True)
            engine.backward(loss)
            opt.step()
        engine.save_checkpoint({"phase": "pretrain", "epoch": epoch + 1,
                                "model": engine.unwrap(model).state_dict(), "opt": opt.state_dict()})
    return {k: v.detach().cpu() for k, v in engine.unwrap(model).state_dict().items()}


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
        "tiny": {"seeds": 1, "source_per_class": 60, "pretrain_epochs": 2, "shots": 3, "val_per_class": 10,
                 "test_per_class": 20, "target_steps": 5, "lrs": (1e-3,), "width": 8},
        "quick": {"seeds": 2, "source_per_class": 1200, "pretrain_epochs": 2, "test_per_class": 500,
                  "target_steps": 60},
        "cpu": {"seeds": 5},
        "full": {"seeds": 5},
    },
    cpu_minutes={"quick": 1, "cpu": 7, "full": 7},
)
def fmnist_transfer(cfg: FmnistTransferConfig, arm: str, seed: int, ctx) -> dict:
    pre = None if arm == "scratch" else pretrain(cfg, seed, ctx)
    x, y = load_fashion_mnist("train", cfg.data_path)
    xt, yt = load_fashion_mnist("test", cfg.data_path)
    g = torch.Generator().manual_seed(10_000 + seed)
    tr = per_class_indices(y, cfg.target_classes, cfg.shots, g)
    g = torch.Generator().manual_seed(10_000 + seed)  # same permutation: validation follows the shots
    va = per_class_indices(y, cfg.target_classes, cfg.val_per_class, g, skip=cfg.shots)
    te = per_class_indices(yt, cfg.target_classes, cfg.test_per_class, torch.Generator().manual_seed(0))
    xtr, ytr = _as_float(x[tr]), _relabel(y[tr], cfg.target_classes)
    xva, yva = _as_float(x[va]), _relabel(y[va], cfg.target_classes)
    xte, yte = _as_float(xt[te]), _relabel(yt[te], cfg.target_classes)
    lr, model = ctx.choose_on_validation("lr", cfg.lrs, fit=lambda lr: _train_target(arm, pre, cfg, lr, seed, xtr, ytr),
                                         score=lambda m: evaluate_classifier(m, xva, yva))
    val = ctx.choices["lr"]["scores"][list(cfg.lrs).index(lr)]
    return {"test_acc": 100 * evaluate_classifier(model, xte, yte), "val_acc": 100 * val, "lr": lr}
