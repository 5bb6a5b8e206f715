"""KIND: knowledge integration and diversion (Xie et al., arXiv 2408.07337; ICML 2025).

Projections of a diffusion transformer are trained as sums of rank-1 components: learngenes (shared
by all classes) and tailors (switched on per class by a gate). For a new task the learngenes are
kept frozen and new random tailors are trained. See docs/kind.md.
"""

from .config import KindConfig
from .gate import ClassGate
from .io import extract_learngenes, from_pretrained, load_learngenes, save_learngenes, save_pretrained
from .layer import GateContext, KindLinear, SplitQKV
from .model import (
           convert,
           convert_dit_to_kind,  # noqa: F401  (deprecated alias, importable for one release)
           fit,
           kind_stats,
           merge,
           pretrain,
           reset_class_embedders,
           transfer,
)

__all__ = ["KindConfig", "KindLinear", "ClassGate", "GateContext", "SplitQKV", "convert", "fit", "pretrain",
           "transfer", "merge", "kind_stats", "reset_class_embedders", "save_pretrained", "from_pretrained",
           "extract_learngenes", "save_learngenes", "load_learngenes"]
