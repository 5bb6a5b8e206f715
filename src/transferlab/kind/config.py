"""Configuration of the KIND decomposition (which layers, how many components, how the gate routes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..core.config import field
from ..core.errors import UserError

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclass(frozen=True)
class KindConfig:
    """KIND (Xie et al., arXiv 2408.07337 / ICML 2025): the decomposition as stated in the abstract and restated
    by the same authors in DivControl (arXiv 2507.23620) §3.2; section numbers of KIND itself are not in our sources.

    Every targeted projection W (out x in) becomes W = U diag(s) V^T = sum_i u_i s_i v_i^T, with the
    first `n_learngene` rank-1 components shared by all classes (learngenes) and the next `n_tailor`
    components (tailors) switched on per class by a fixed class gate. Fields marked [reconstructed]
    are not given in the available paper sources (Algorithm 1 and the hyperparameters are not public
    in text form); they are library choices, documented in docs/kind.md.
    """

    n_learngene: int = field(48, "learngene components per matrix [reconstructed: DivControl uses width/2]")
    n_tailor: int = field(48, "tailor components per matrix [reconstructed: DivControl uses width/2]")
    k_active: int | None = field(None, "tailors switched on per class; None = n_tailor // num_classes "
                                       "(disjoint blocks) [reconstructed]")
    assignment: Literal["block", "random"] = field("block", "gate rule: 'block' gives class c the tailors "
                                                   "c*k..c*k+k-1 (disjoint when classes*k <= n_tailor); 'random' "
                                                   "a fixed random k-subset per class [reconstructed]")
    gate: bool = field(True, "route tailors by class; False switches every tailor on for every label, "
                             "the null label included (the 'no gate' ablation: no diversion)")
    gate_seed: int = field(0, "seed of the 'random' gate assignment")
    null_class: Literal["learngene_only", "all_tailors"] = field(
        "learngene_only", "what the null (unconditional, CFG) label gets [reconstructed: library choice]")
    targets: tuple[str, ...] = field(TARGETS, "projections to decompose, any of q,k,v,o,fc1,fc2 (paper: all six)")
    init: Literal["random", "svd"] = field("random", "'random': orthonormal U, V with Xavier-matched s (KIND "
                                                     "pre-trains factors from scratch); 'svd': exact SVD of the "
                                                     "existing weights (PiSSA-style) [reconstructed]")
    allow_overcomplete: bool = field(False, "allow n_learngene + n_tailor > min(in, out)")
    compute: Literal["auto", "factored", "dense"] = field(
        "auto", "forward as U((V^T x) s) ('factored': cost grows with active components), as one dense matrix "
                "per class in the batch ('dense'), or the cheaper of the two by a FLOP estimate ('auto')")
    label_arg: str | None = field(None, "name of the class-label argument of the model's forward; None finds "
                                        "'y' (transferlab/facebookresearch DiT) or 'class_labels' (diffusers)")

    def __post_init__(self):
        if self.n_learngene < 0 or self.n_tailor < 0 or self.n_learngene + self.n_tailor < 1:
            raise UserError(f"n_learngene={self.n_learngene} and n_tailor={self.n_tailor} must be >= 0 "
                            "with at least one component")
        if self.k_active is not None and not 0 <= self.k_active <= self.n_tailor:
            raise UserError(f"k_active={self.k_active} must be between 0 and n_tailor={self.n_tailor}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise UserError(f"unknown KIND targets {bad}; choose from {', '.join(TARGETS)}")

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (targets as a list)."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KindConfig:
        """Inverse of `to_dict`; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown KindConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)
