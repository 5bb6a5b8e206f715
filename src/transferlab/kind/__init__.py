"""KIND: knowledge integration and diversion (Xie et al., arXiv 2408.07337; ICML 2025).

Projections of a diffusion transformer are trained as sums of rank-1 components: learngenes (shared
by all classes) and tailors (switched on per class by a gate). For a new task the learngenes are
kept frozen and new random tailors are trained. See docs/kind.md.
"""

from .config import KindConfig
from .gate import ClassGate
from .layer import GateContext, KindLinear, SplitQKV
from .model import (
    convert,
    convert_dit_to_kind,
    fit,
    kind_stats,
    load_learngenes,
    merge,
    pretrain,
    save_learngenes,
    transfer,
)

__all__ = ["KindConfig", "KindLinear", "ClassGate", "GateContext", "SplitQKV", "convert", "convert_dit_to_kind",
           "fit", "pretrain", "transfer", "save_learngenes", "load_learngenes", "merge", "kind_stats"]
