"""Strategy configs for GPM, TRGP, CUBER and EWC (frozen dataclasses with help text).

Defaults are the official PMNIST settings (sahagobinda/GPM, LYang-666/TRGP). Every CUBER-specific
field is [reconstructed]: the paper's exact inequalities were not available (see docs/cuber.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import field
from ..core.errors import UserError
from .memory import check_threshold

SOLVERS = ("eigh", "svd", "lowrank")
STEP_RULES = ("free", "agem", "gate", "along", "backward", "share_q")
CORR_SPACES = ("subspace", "full")


@dataclass(frozen=True)
class GPMConfig:
    """Gradient Projection Memory (Saha, Garg, Roy, ICLR 2021), Sec. 4 and the official PMNIST script.

    Thresholds: PMNIST [0.95, 0.99, 0.99]; CIFAR-100 0.97 + 0.003 * task_id (Sec. 5 / code).
    """

    thresholds: tuple[float, ...] = field((0.95, 0.99, 0.99), "energy threshold eps per protected layer "
                                          "(one value = all layers); must lie in (0, 1)")
    threshold_step: float = field(0.0, "added to every threshold per task: eps + step * task_id (CIFAR: 0.003)")
    n_samples: tuple[int, ...] = field((300,), "task samples for each layer's representation matrix (one value = all)")
    rep_batch: int | None = field(125, "forward batch size when building representations (with batch-statistics "
                                  "BN it changes them; GPM's code: one batch of 125); None = the loader's batches")
    solver: str = field("eigh", "basis solver: eigh (Gram + symmetric eigh), svd (GPM's exact path), lowrank")
    input_projection: bool = field(True, "bias-free Linear: project the layer input in backward instead of "
                                   "the weight gradient (identical gradient), for batches with no more rows than the "
                                   "layer has outputs, where it is cheaper [reconstructed speed-up]")
    input_cache: bool = field(False, "[reconstructed speed-up] project the first protected layer's training inputs "
                              "once per task (`project_inputs`) instead of every step; needs the task's whole "
                              "training set in memory and a bias-free first Linear that sees the raw input; the other "
                              "layers with fan-in <= 256 then project their weight gradient with one dense m x m "
                              "complement projector (one matmul: the same gradient up to rounding)")
    freeze_bn_after_first: bool = field(True, "zero the gradients of 1-D parameters (BN affine, biases) of shared "
                                        "layers after task 0, as GPM's code does")
    exclude: tuple[str, ...] = field(("heads",), "module-name substrings that are task-specific (not protected)")

    def __post_init__(self):
        if not self.thresholds:
            raise UserError("thresholds must list at least one energy threshold")
        for t in self.thresholds:
            check_threshold(t)
        if self.solver not in SOLVERS:
            raise UserError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not self.n_samples or min(self.n_samples) < 1:
            raise UserError("n_samples must list positive sample counts")
        if self.rep_batch is not None and self.rep_batch < 1:
            raise UserError(f"rep_batch must be >= 1 or None, got {self.rep_batch}")

    def threshold_fn(self, n_layers: int):
        ts = self.thresholds if len(self.thresholds) > 1 else self.thresholds * n_layers
        if len(ts) != n_layers:
            raise UserError(f"thresholds has {len(ts)} values but the model has {n_layers} protected layers")
        return lambda task_id, i: min(ts[i] + self.threshold_step * task_id, 0.9999)

    def samples(self, n_layers: int) -> list[int]:
        ns = self.n_samples if len(self.n_samples) > 1 else self.n_samples * n_layers
        if len(ns) != n_layers:
            raise UserError(f"n_samples has {len(ns)} values but the model has {n_layers} protected layers")
        return list(ns)


@dataclass(frozen=True)
class TRGPConfig(GPMConfig):
    """Trust Region Gradient Projection (Lin, Yang, Fan, Zhang, ICLR 2022), Sec. 4.1-4.2 and official code.

    eps_proj is the code's `eplison_1` (0.2 PMNIST, 0.5 CIFAR/5-Datasets/MiniImageNet); top_k = 2.
    The code's hard-coded choice of old task 1 for the third task is not reproduced (always top-k).
    """

    eps_proj: float = field(0.2, "trust-region threshold eps_1: old task j is selected for layer l when "
                            "||g_l M_j M_j^T|| > eps_1 ||g_l|| for the new task's probe gradient g_l")
    top_k: int = field(2, "at most this many old tasks per layer get a scaling matrix Q")
    probe_samples: int = field(300, "training samples in the one probe batch that measures task correlation")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eps_proj < 1.0:
            raise UserError(f"eps_proj must lie in [0, 1), got {self.eps_proj}")
        if self.top_k < 0 or self.probe_samples < 1:
            raise UserError("top_k must be >= 0 and probe_samples >= 1")


@dataclass(frozen=True)
class CUBERConfig(TRGPConfig):
    """CUBER (Lin, Yang, Fan, Zhang, NeurIPS 2022), Sec. 4 "sufficient projection" / "positive correlation".

    [reconstructed] Regime 3 (sufficient projection AND positive correlation): the new task's update
    may move inside old task j's input subspace S_j. Positive correlation is tested as
    cos(P_j g_t, P_j g_j) >= eps_corr, g_j the gradient of task j's loss at its own final weights
    (stored per layer at the end of task j; no raw data is kept). `rule` says what Regime 3 does.
    The default, `free`, is the reading closest to the paper's text ("selectively modifies the
    learnt model of the old tasks when learning the new task"; correlation defined through "the
    gradient projection onto the subspaces of old tasks"): the new task's own gradient keeps its
    component inside the positively correlated old tasks' subspaces. Every other rule is a named
    variant; tables name the rule of every CUBER column.
    """

    eps_corr: float = field(0.0, "[reconstructed] positive-correlation threshold eps_2 on the cosine between the "
                            "new task's and old task's in-subspace gradients (an undefined cosine, from a zero "
                            "projection, is never positive)")
    rule: str = field("free", "[reconstructed] Regime-3 update. Paper reading, the new task's own gradient moves "
                      "inside S_j: free (keep it, default), agem (remove the part that would raise an old task's "
                      "first-order loss), gate (drop it if it would). Variants: along (keep only the component "
                      "along old tasks' stored gradients, when positive); backward (the new task's gradient stays "
                      "GPM-projected and each step adds step_scale x old task j's stored in-subspace gradient, "
                      "when that lowers the new task's and no old task's first-order loss); share_q (the weights "
                      "stay GPM-projected; old task j adopts step_scale x (Q_tj - I) of the new task's TRGP "
                      "scaling when that lowers j's first-order loss)")
    step_scale: float = field(1.0, "[reconstructed] scale of the in-subspace component of the update (backward: "
                              "the step size on the stored old-task gradient; share_q: the share of Q_tj - I)")
    corr_space: str = field("subspace", "[reconstructed] where the positive-correlation cosine is measured: subspace "
                            "(cos(P_j g_t, P_j g_j), the paper's reading) or full (cos(g_t, g_j) over the layer)")
    trust_radius: float = field(0.0, "[reconstructed] in-subspace moves fade out once they reach this fraction of "
                                "the in-subspace weight norm per task (0 = unbounded, the paper describes no radius)")
    grad_samples: int = field(300, "[reconstructed] samples used for the end-of-task gradient g_j stored per layer")
    scale_regime3: bool = field(True, "[reconstructed] Regime-3 tasks also get TRGP's scaling matrix Q")

    def __post_init__(self):
        super().__post_init__()
        if not -1.0 <= self.eps_corr <= 1.0:
            raise UserError(f"eps_corr is a cosine threshold in [-1, 1], got {self.eps_corr}")
        if self.rule not in STEP_RULES:
            raise UserError(f"rule must be one of {STEP_RULES}, got {self.rule!r}")
        if self.rule == "share_q" and not self.scale_regime3:
            raise UserError("rule='share_q' shares the new task's scaling matrices with old tasks; "
                            "it needs scale_regime3=True")
        if self.corr_space not in CORR_SPACES:
            raise UserError(f"corr_space must be one of {CORR_SPACES}, got {self.corr_space!r}")
        if self.step_scale < 0 or self.grad_samples < 1 or self.trust_radius < 0:
            raise UserError("step_scale and trust_radius must be >= 0 and grad_samples >= 1")


@dataclass(frozen=True)
class EWCConfig:
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), Eq. 3: diagonal Fisher per task."""

    lam: float = field(100.0, "penalty strength lambda (sum over old tasks of lambda/2 F_j (theta - theta_j)^2)")
    fisher_samples: int = field(200, "per-sample squared gradients averaged for the diagonal Fisher")
    exclude: tuple[str, ...] = field(("heads",), "parameter-name substrings that are not penalised")

    def __post_init__(self):
        if self.lam < 0 or self.fisher_samples < 1:
            raise UserError("lam must be >= 0 and fisher_samples >= 1")
