"""Configuration of the CPRD objective.

Chen et al., CVPR 2024 (arXiv 2407.07479), method section (its number is unverified: only the
abstract was available). The abstract fixes the structure:
student-mined hard negatives, a partial ranking target from the cross-encoder, a contrastive
objective, coordinated with the dual encoder's contrastive (ITC) loss. Every number below, and the
validity rule, is **reconstructed** (the method section and hyperparameters were not available):
they are options, with defaults chosen on our validation splits, not taken from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import field
from ..core.errors import UserError
from .loss import RANK_REDUCTIONS, VALID_RULES

TEACHER_SOURCES = ("teacher", "self", "random")


@dataclass(frozen=True)
class CPRDConfig:
    """CPRD loss settings (paper: method section and abstract; K, tau, weight, validity rule reconstructed)."""

    k: int | None = field(8, "hard negatives mined per anchor by the student (reconstructed; None = all "
                             "negatives, the cprd_all ablation)")
    weight: float = field(1.0, "λ: weight of the distillation term added to InfoNCE (reconstructed)")
    tau: float | None = field(None, "student temperature inside the distillation term; None = the learnable "
                                    "InfoNCE temperature, detached (reconstructed)")
    valid: str = field("all", "validity rule for the partial ranking: all, top_m, threshold or below_positive "
                              "(negatives the teacher scores above the positive are invalid) (reconstructed)")
    valid_param: float | None = field(None, "m for top_m, the teacher-score threshold for threshold")
    rank_reduction: str = field("mean", "a row's CPRD loss: mean or sum of its rank terms (the survey formula "
                                        "sums; the mean divides λ by the number of valid ranks)")
    skip: int = field(0, "hardest student negatives passed over before mining K (skip=K: ranks K+1..2K, the "
                         "easy-negatives ablation)")
    teacher_source: str = field("teacher", "where the distilled scores come from: teacher, self (the student's "
                                           "own detached similarities: a control) or random (a random order: "
                                           "a control)")
    symmetric: bool = field(True, "distil image->text and text->image (reconstructed: ITC is symmetric)")
    teacher_temp: float = field(1.0, "teacher temperature of the KL / ListNet baselines")
    margin_on: str = field("cosine", "margin-MSE student margins on raw cosines (cosine, the sentence-transformers "
                                     "convention) or on cosine / tau (logit)")

    def __post_init__(self):
        if self.k is not None and (int(self.k) != self.k or self.k < 1):
            raise UserError(f"k must be a positive integer or None, got {self.k!r}")
        if self.valid not in VALID_RULES:
            raise UserError(f"valid must be one of {', '.join(VALID_RULES)}, got {self.valid!r}")
        if self.valid in ("top_m", "threshold") and self.valid_param is None:
            raise UserError(f"valid={self.valid!r} needs valid_param (m for top_m, the threshold for threshold)")
        if self.rank_reduction not in RANK_REDUCTIONS:
            raise UserError(f"rank_reduction must be one of {', '.join(RANK_REDUCTIONS)}, got {self.rank_reduction!r}")
        if self.teacher_source not in TEACHER_SOURCES:
            raise UserError(f"teacher_source must be one of {', '.join(TEACHER_SOURCES)}, got {self.teacher_source!r}")
        if self.margin_on not in ("cosine", "logit"):
            raise UserError(f"margin_on must be cosine or logit, got {self.margin_on!r}")
        if int(self.skip) != self.skip or self.skip < 0:
            raise UserError(f"skip must be a non-negative integer, got {self.skip!r}")
        if self.skip and self.k is None:
            raise UserError("skip needs an integer k (it mines ranks skip+1..skip+k)")
        if self.tau is not None and self.tau <= 0:
            raise UserError(f"tau must be positive, got {self.tau}")
        if self.weight < 0:
            raise UserError(f"weight must be >= 0, got {self.weight}")
        if self.teacher_temp <= 0:
            raise UserError(f"teacher_temp must be positive, got {self.teacher_temp}")
