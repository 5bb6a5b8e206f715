"""Configuration of the Meta-DMoE training procedure (Zhong et al., NeurIPS 2022, arXiv 2210.03885).

Paper/official-code defaults are quoted per field; fields marked [reconstructed] are choices of
ours for small CPU-scale backbones that the paper does not make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.config import field
from ..core.errors import UserError


@dataclass(frozen=True)
class MetaDMoEConfig:
    """Hyperparameters of the four Meta-DMoE stages (paper Sec. 3 / Alg. 1; official `src/configs.py`).

    Stage 1 trains one expert per source domain (or domain group), stage 2 pre-trains the aggregator
    with cross-entropy on the experts' features, stage 3 trains the student by ERM on all sources and
    stage 4 meta-trains student and aggregator with (second-order) MAML so that one MSE step towards
    the aggregated teacher feature on unlabeled support data lowers the labeled query loss.
    """

    # --- test-time adaptation (shared by meta-training and `adapt`) ---
    inner_lr: float = field(1e-3, "alpha: SGD step size of the inner (adaptation) step on the feature MSE "
                                  "(official: 1e-4..1e-3; 1e-3 chosen on source validation in our experiments)")
    inner_steps: int = field(1, "number of inner SGD steps (paper: 1)")
    first_order: bool = field(False, "drop second-order terms in meta-training; the aggregator then gets "
                                     "exactly zero meta-gradient (paper: second order)")
    mask_own_expert: bool = field(True, "drop the expert of the episode's own domain from the teacher "
                                        "during meta-training (paper: True; 'w/o mask' ablation: False)")
    train_mode: Literal["eval", "train"] = field(
        "eval", "mode of student (features + head) and aggregator in meta-training and in the test-time step: "
                "'eval' = BN running statistics frozen, aggregator dropout off (official train_epoch/eval); "
                "'train' = BN normalises with the batch and meta-training updates its running statistics")
    expert_bn: Literal["eval", "batch"] = field(
        "eval", "BatchNorm of the frozen experts in the test-time step: 'eval' = their running statistics "
                "(as in meta-training); 'batch' = the support batch's statistics, which is what the official "
                "test code does (it never puts the experts in eval mode); running statistics are kept")
    log_every: int = field(25, "meta-training curve: mean query loss before/after the inner step per block of "
                               "this many episodes (the official code logs it per iteration)")
    teacher: Literal["aggregator", "average"] = field(
        "aggregator", "teacher feature: transformer aggregator (paper) or plain average of expert features "
                      "(ablation; no aggregator is learned)")
    # --- stage 1-3: supervised pre-training ---
    expert_epochs: int = field(3, "epochs of cross-entropy training per expert")
    expert_lr: float = field(1e-3, "Adam learning rate of the experts")
    expert_init: Literal["scratch", "student"] = field(
        "student", "[reconstructed] start every expert from the ERM student's weights ('student') or from "
                   "its own initialisation ('scratch'). The paper starts student and experts from the same "
                   "ImageNet weights, which keeps their feature spaces comparable; a shared source-trained "
                   "start is our CPU-scale stand-in")
    aggregator_epochs: int = field(5, "epochs of cross-entropy pre-training of the aggregator (all experts)")
    aggregator_lr: float = field(1e-4, "Adam learning rate of aggregator pre-training (official 1e-6..1e-5; "
                                       "small keeps the teacher near its init, the expert average)")
    student_epochs: int = field(3, "epochs of ERM training of the student on all source domains")
    student_lr: float = field(1e-3, "Adam learning rate of the student's ERM pre-training")
    batch_size: int = field(64, "batch size of the supervised stages 1-3")
    patience: int = field(0, "early stopping of stages 1 and 3 when validation data is passed: stop after this many "
                             "epochs without a better validation accuracy and keep the best epoch (0 = run all "
                             "epochs; official: best OOD-validation checkpoint)")
    # --- stage 4: meta-training ---
    meta_epochs: int = field(2, "meta-training epochs; one epoch = `episodes_per_epoch` episodes")
    episodes_per_epoch: int = field(100, "episodes (meta-updates) per meta-epoch; one domain per episode")
    support_size: int = field(64, "unlabeled support images per episode (official: 24-75)")
    query_size: int = field(64, "labeled query images per episode, from the same domain")
    outer_lr: float = field(1e-4, "beta: Adam learning rate of the student (features + head) in meta-training")
    aggregator_meta_lr: float = field(1e-4, "Adam learning rate of the aggregator in meta-training")
    lr_decay: float = field(0.96, "per-meta-epoch multiplicative decay of both meta learning rates (official)")

    def __post_init__(self):
        checks = {
            "inner_lr": self.inner_lr > 0, "inner_steps": self.inner_steps >= 1,
            "expert_epochs": self.expert_epochs >= 0, "aggregator_epochs": self.aggregator_epochs >= 0,
            "student_epochs": self.student_epochs >= 0, "meta_epochs": self.meta_epochs >= 0,
            "episodes_per_epoch": self.episodes_per_epoch >= 1, "support_size": self.support_size >= 1,
            "query_size": self.query_size >= 1, "batch_size": self.batch_size >= 1,
            "lr_decay": 0 < self.lr_decay <= 1, "patience": self.patience >= 0, "log_every": self.log_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"MetaDMoEConfig: invalid value for {', '.join(bad)} "
                            "(learning rates and sizes must be positive, epochs >= 0, 0 < lr_decay <= 1)")
        if self.teacher not in ("aggregator", "average"):
            raise UserError(f"MetaDMoEConfig.teacher must be 'aggregator' or 'average', got {self.teacher!r}")
        if self.train_mode not in ("eval", "train"):
            raise UserError(f"MetaDMoEConfig.train_mode must be 'eval' or 'train', got {self.train_mode!r}")
        if self.expert_bn not in ("eval", "batch"):
            raise UserError(f"MetaDMoEConfig.expert_bn must be 'eval' or 'batch', got {self.expert_bn!r}")
        if self.expert_init not in ("scratch", "student"):
            raise UserError(f"MetaDMoEConfig.expert_init must be 'scratch' or 'student', got {self.expert_init!r}")
