"""CUBER experiments on real Fashion-MNIST.

Streams: permuted (GPM's PMNIST protocol), split (conv GPM), rotated (neighbouring tasks
correlated), chunks (one 10-class problem in disjoint chunks: every pair positively correlated,
the mechanism check) and shared pairs (binary class pairs that share a class, multi-head CNN,
trained to convergence with validation early stopping, GPM's CIFAR protocol).

Every arm of a seed sees the same tasks and the same initial weights (paired comparison). Test
seeds are 0..seeds-1; hyperparameters chosen on validation (EWC's lambda, the `cuber_val` arm's
rule) are chosen once per config on `val_seeds` other seeds (1000, 1001, ...), scored on the
held-out validation images, never on a test seed or the test set.
Reported: ACC, BWT, FWT (vs the untrained model), forgetting, and the accuracy matrix R.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..core.config import field
from ..core.errors import UserError
from ..core.registry import Figures, register_experiment
from ..core.stats import fmt_ci, mean_ci, paired_diff
from ..nn import MLP
from .config import STEP_RULES, CUBERConfig, EWCConfig, GPMConfig, TRGPConfig
from .metrics import summarize
from .models import MultiHeadCNN, multihead_forward
from .strategies import EWC, GPM, Finetune
from .streams import SHARED_PAIRS, chunks_stream, permuted_stream, rotated_stream, split_stream
from .train import run_multitask, run_stream
from .trgp import CUBER, TRGP

METRICS = ("acc", "bwt", "fwt", "forgetting")
VAL_SEED0 = 1000
LONG = ("gpm_long", "trgp_long", "cuber_long")
ARMS_HELP = ("arms: finetune, ewc (lambda chosen on validation), gpm, trgp, cuber (CUBERConfig's rule, "
             "default free = the paper's reading), cuber_<rule> for each named rule variant, cuber_val (rule "
             "chosen on validation from val_rules), gpm_long / trgp_long / cuber_long (long_epochs per task), "
             "multitask")


@dataclass(frozen=True)
class StreamConfig:
    """Common fields of the CUBER experiments (GPM's PMNIST protocol, Saha et al. 2021 Sec. 5)."""

    arms: tuple[str, ...] = field(("finetune", "ewc", "gpm", "trgp", "cuber", "multitask"), ARMS_HELP)
    seeds: int = field(5, "number of test seeds (0..seeds-1)")
    val_seeds: int = field(3, "validation seeds (1000, 1001, ...) on which EWC's lambda and cuber_val's rule are "
                           "chosen, scored on the validation images")
    n_tasks: int = field(10, "tasks in the stream")
    n_train: int | None = field(None, "training images drawn per task before the validation split (None = all)")
    n_test: int | None = field(None, "test images per task (None = all 10k)")
    val_frac: float = field(0.1, "fraction of each task's training draw held out for validation (GPM: 10%)")
    normalize: bool = field(True, "normalise inputs by the dataset mean/std (GPM's PMNIST loader, before permuting)")
    epochs: int = field(5, "SGD epochs per task (the maximum when patience > 0)")
    patience: int = field(0, "0 = fixed budget; > 0 = GPM's CIFAR schedule: lr / lr_factor after this many epochs "
                          "without a lower validation loss, stop below lr_min")
    lr_factor: float = field(2.0, "lr divisor of the validation schedule (GPM CIFAR: 2)")
    lr_min: float = field(1e-5, "the validation schedule stops once the lr falls below this (GPM CIFAR: 1e-5)")
    restore_best: bool = field(True, "with patience > 0, restore the best-validation weights (GPM's CIFAR code)")
    lr: float = field(0.01, "SGD learning rate (fresh optimiser per task, no momentum)")
    batch_size: int = field(10, "batch size")
    val_rules: tuple[str, ...] = field(("free", "agem", "gate", "backward"), "rules the cuber_val arm chooses from")
    method: CUBERConfig = field(CUBERConfig(), "GPM / TRGP / CUBER settings shared by the projection arms (the "
                                "gpm and trgp arms read the fields of their own configs); flat keys reach them: "
                                "--set rule=gate, --set thresholds=0.97")
    ewc_grid: tuple[float, ...] = field((1.0, 10.0, 100.0, 1000.0, 10000.0), "EWC lambdas; the one with the best "
                                        "mean validation ACC over val_seeds is used")
    long_epochs: int = field(0, "epochs per task of the *_long arms (0 = 3x epochs)")
    eval_split: Literal["test", "val"] = field("test", "evaluate on test (report) or val (hyperparameter choice)")
    data_path: str | None = field(None, "folder with the Fashion-MNIST IDX files (default: Debian package)")

    def __post_init__(self):
        if self.n_tasks < 2:
            raise UserError("n_tasks must be at least 2 (BWT/FWT need two tasks)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0 < self.val_frac < 1:
            raise UserError(f"val_frac must lie in (0, 1), got {self.val_frac}")
        if self.val_seeds < 1 or not self.ewc_grid or not self.val_rules:
            raise UserError("val_seeds must be >= 1 and ewc_grid / val_rules non-empty")
        for arm in self.arms:
            arm_rule(arm)  # unknown arms fail here, before any run
        for r in self.val_rules:
            CUBERConfig(rule=r)  # validates each rule with a clear error


def arm_rule(arm: str) -> str | None:
    """The Regime-3 rule a CUBER arm uses (None for other arms; "" = the config's `rule`)."""
    if arm in ("finetune", "ewc", "gpm", "gpm_long", "trgp", "trgp_long", "multitask"):
        return None
    if arm in ("cuber", "cuber_long", "cuber_val"):
        return ""
    if arm.startswith("cuber_") and arm[6:] in STEP_RULES:
        return arm[6:]
    raise UserError(f"unknown arm {arm!r}; {ARMS_HELP}")


def _as(cls, m: CUBERConfig):
    """`m`'s values of the fields `cls` has (GPMConfig and TRGPConfig are CUBERConfig's bases)."""
    return cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(cls)})


def make_strategy(arm: str, model, cfg, forward=None, ewc_lam: float | None = None, rule: str | None = None):
    m = cfg.method
    if arm == "finetune":
        return Finetune(model, forward)
    if arm == "ewc":
        return EWC(model, EWCConfig(lam=cfg.ewc_grid[0] if ewc_lam is None else ewc_lam), forward)
    if arm in ("gpm", "gpm_long"):
        return GPM(model, _as(GPMConfig, m), forward)
    if arm in ("trgp", "trgp_long"):
        return TRGP(model, _as(TRGPConfig, m), forward)
    return CUBER(model, replace(m, rule=rule or arm_rule(arm) or m.rule), forward)


def fit_arm(cfg, arm: str, seed: int, device, tasks, make_model, forward=None, engine=None,
            ewc_lam: float | None = None, rule: str | None = None) -> dict:
    """One (arm, seed) on `tasks`; evaluated on cfg.eval_split. `engine` (optional) checkpoints."""
    torch.manual_seed(seed)  # same initial weights for every arm of a seed
    model = make_model().to(device)
    kw = dict(lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, engine=engine, split=cfg.eval_split)
    if arm == "multitask":
        out = run_multitask(model, tasks, epochs=cfg.epochs, forward=forward, **kw)
        return {"acc": sum(out["R"][0]) / len(out["R"][0]), "bwt": math.nan, "fwt": math.nan,
                "forgetting": math.nan, "R": out["R"], "b": out["b"]}
    strategy = make_strategy(arm, model, cfg, forward, ewc_lam, rule)
    epochs = (cfg.long_epochs or 3 * cfg.epochs) if arm in LONG else cfg.epochs
    out = run_stream(model, strategy, tasks, epochs=epochs, patience=cfg.patience, lr_factor=cfg.lr_factor,
                     lr_min=cfg.lr_min, restore_best=cfg.restore_best, **kw)
    res = {**summarize(out["R"], out["b"]), "R": out["R"], "b": out["b"]}
    if hasattr(strategy, "memory"):
        res["basis_dims"] = strategy.memory.dims()
    if hasattr(strategy, "regimes"):  # how often each regime was chosen (diagnostics for CUBER/TRGP)
        counts = {1: 0, 2: 0, 3: 0}
        for per_layer in strategy.regimes.values():
            for rows in per_layer.values():
                for r in rows:
                    counts[r[1]] += 1
        res.update({f"regime{k}": float(v) for k, v in counts.items()})
    return res


def choose_on_val_seeds(cfg, name: str, candidates, fit_one, ctx) -> tuple:
    """Mean validation ACC of each candidate over the validation seeds; the best (first on ties).

    The choice is made across seeds, so it is computed once per config and shared by every test
    seed (`ctx.shared`), and recorded in each run's results line (`ctx.record_choice`).
    """
    def build():
        val = replace(cfg, eval_split="val")
        scores = [sum(fit_one(val, c, VAL_SEED0 + k)["acc"] for k in range(cfg.val_seeds)) / cfg.val_seeds
                  for c in candidates]
        return {"scores": scores}
    key = [name, list(candidates), {k: v for k, v in vars(cfg).items() if k not in ("arms", "seeds", "eval_split")}]
    scores = ctx.shared(f"choice-{name}", build, per_seed=False, key=key)["scores"]
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    ctx.record_choice(name, list(candidates), scores, candidates[best])
    return candidates[best], scores


def run_arm(cfg, arm: str, seed: int, ctx, make_tasks, make_model, forward=None) -> dict:
    """One test (arm, seed); EWC's lambda and cuber_val's rule come from the validation seeds."""
    dev = ctx.device

    def fit_one(c, extra: dict, s: int) -> dict:
        return fit_arm(c, arm, s, dev, make_tasks(c, s), make_model, forward, **extra)

    extra, chosen = {}, {}
    if arm == "ewc":
        lam, _ = choose_on_val_seeds(cfg, "ewc_lam", list(cfg.ewc_grid),
                                     lambda c, v, s: fit_one(c, {"ewc_lam": v}, s), ctx)
        extra, chosen = {"ewc_lam": lam}, {"ewc_lam": lam}
    elif arm == "cuber_val":
        rule, _ = choose_on_val_seeds(cfg, "cuber_rule", list(cfg.val_rules),
                                      lambda c, v, s: fit_one(c, {"rule": v}, s), ctx)
        extra = {"rule": rule}
        chosen = {"rule_index": float(STEP_RULES.index(rule))}
    res = fit_arm(cfg, arm, seed, dev, make_tasks(cfg, seed), make_model, forward, ctx, **extra)
    return {**res, **chosen}


# ---- plots and notes ------------------------------------------------------------------------------
def plot_matrices(rows: list[dict], cfg: StreamConfig, out_dir) -> Figures:
    """accuracy_matrix.png: mean R over seeds per arm, and the paired checks as notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in cfg.arms if any(r["arm"] == a and len(r["metrics"].get("R", [])) > 1 for r in rows)]
    paths = []
    if arms:
        fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.2), squeeze=False)
        for k, (ax, arm) in enumerate(zip(axes[0], arms)):
            Rs = torch.tensor([r["metrics"]["R"] for r in rows if r["arm"] == arm], dtype=torch.float64)
            im = ax.imshow(Rs.mean(0).numpy(), vmin=0, vmax=100, cmap="viridis")
            ax.set_title(f"{arm} (n={len(Rs)})", fontsize=9)
            ax.set_xlabel("evaluated task j", fontsize=8)
            if k == 0:
                ax.set_ylabel("after training task i", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="test accuracy %")
        path = out_dir / "accuracy_matrix.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return Figures(paths, checks_markdown(rows, cfg))


def _by_seed(rows, arm, metric):
    return {r["seed"]: r["metrics"][metric] for r in rows if r["arm"] == arm and metric in r["metrics"]}


def rule_label(arm: str, cfg: StreamConfig) -> str:
    """What a CUBER column ran: its rule and the Regime-3 settings."""
    r = arm_rule(arm)
    m = cfg.method
    rule = "chosen on validation from " + "/".join(cfg.val_rules) if arm == "cuber_val" else (r or m.rule)
    return (f"rule={rule}, corr_space={m.corr_space}, eps_corr={m.eps_corr}, "
            f"trust_radius={m.trust_radius}, step_scale={m.step_scale}")


def checks_markdown(rows: list[dict], cfg: StreamConfig) -> str:
    """Paired (per-seed) comparisons of every CUBER arm with GPM and TRGP, computed from the rows."""
    arms = list(cfg.arms) + sorted({r["arm"] for r in rows} - set(cfg.arms))  # + other profiles' arms
    lines = ["Paired differences over test seeds (mean ± 95% CI; heatmaps in accuracy_matrix.png):", ""]
    cubers = [a for a in arms if arm_rule(a) is not None]
    for a in cubers:
        lines.append(f"- `{a}`: {rule_label(a, cfg)}")
    pairs = [("trgp", "gpm", "acc"), ("gpm_long", "gpm", "bwt"), ("trgp_long", "gpm_long", "bwt")]
    for a in cubers:
        base = ("gpm_long", "trgp_long") if a == "cuber_long" else ("gpm", "trgp")
        pairs += [(a, b, m) for b in base for m in ("bwt", "acc")]
    for a, b, m in pairs:
        if a in arms and b in arms:
            mean, half, n = paired_diff(_by_seed(rows, a, m), _by_seed(rows, b, m))
            if n:
                verdict = "" if math.isnan(half) else (
                    " (CI above 0)" if mean - half > 0 else " (CI below 0)" if mean + half < 0 else " (CI includes 0)")
                lines.append(f"- {m.upper()} {a} − {b}: {fmt_ci(mean, half)} over {n} seeds{verdict}")
    for arm in ["trgp", *cubers]:
        if arm in arms:
            reg = [mean_ci(_by_seed(rows, arm, f"regime{k}").values())[0] for k in (1, 2, 3)]
            if not any(math.isnan(x) for x in reg):
                lines.append(f"- {arm}: (layer, old task) pairs per run in regime 1/2/3: "
                             + " / ".join(f"{x:.1f}" for x in reg))
    lam = {r["metrics"].get("ewc_lam") for r in rows if r["arm"] == "ewc"} - {None}
    if lam:
        lines.append(f"- EWC lambda chosen on {cfg.val_seeds} validation seeds from {cfg.ewc_grid}: "
                     + ", ".join(f"{v:g}" for v in sorted(lam)))
    return "\n".join(lines) + "\n"


# ---- the experiments ---------------------------------------------------------------------------------
def _mlp():
    return MLP(784, (100, 100), 10, bias=False)


_ALL = ("finetune", "ewc", "gpm", "trgp", "cuber", "cuber_agem", "cuber_gate", "cuber_backward", "cuber_val",
        "multitask")


@dataclass(frozen=True)
class PermutedConfig(StreamConfig):
    """10 permuted Fashion-MNIST tasks, GPM's PMNIST protocol (Saha et al. 2021, Sec. 5; TRGP Sec. 5)."""


@register_experiment(
    "cuber-pfmnist", config=PermutedConfig, reference="gpm", metrics=METRICS, method="cuber", primary="bwt",
    description="10 permuted Fashion-MNIST tasks, MLP 784-100-100-10 without bias, SGD lr 0.01 batch 10, "
                "5 epochs (GPM's PMNIST protocol): finetune/EWC/GPM/TRGP/CUBER/multitask",
    # quick: 4 tasks x 3600 images, lr 0.05 so a few hundred steps learn each task (demo, not the protocol)
    profiles={"quick": {"seeds": 2, "val_seeds": 1, "n_tasks": 4, "n_train": 4000, "n_test": 2000, "epochs": 3,
                        "lr": 0.05, "ewc_grid": (10.0, 1000.0)},
              # tiny: seconds, for the tests (every arm, two short tasks)
              "tiny": {"seeds": 1, "val_seeds": 1, "n_tasks": 2, "n_train": 200, "n_test": 100, "epochs": 1,
                       "lr": 0.05, "ewc_grid": (10.0, 1000.0)},
              # cpu: the quick data and budget over all 10 tasks, 5 seeds (≈ 33 CPU-thread seconds per run on
              # average: 30 runs in 8 minutes with --jobs 2)
              "cpu": {"seeds": 5, "val_seeds": 1, "n_tasks": 10, "n_train": 4000, "n_test": 2000, "epochs": 3,
                      "lr": 0.05, "ewc_grid": (10.0, 1000.0)},
              "full": {"seeds": 5}},
    cpu_minutes={"cpu": 17},
    plot=plot_matrices,
)
def cuber_pfmnist(cfg: PermutedConfig, arm: str, seed: int, ctx) -> dict:
    return run_arm(cfg, arm, seed, ctx,
                   lambda c, s: permuted_stream(c.n_tasks, c.n_train, c.n_test, c.val_frac, s, c.data_path,
                                                c.normalize), _mlp)


@dataclass(frozen=True)
class SplitConfig(StreamConfig):
    """Split Fashion-MNIST, 5 x 2 classes, multi-head CNN (exercises GPM's conv path, Saha et al. Sec. 4)."""

    n_tasks: int = field(5, "tasks (fixed: 10 classes / classes_per_task)")
    classes_per_task: int = field(2, "classes per task")
    n_train: int | None = field(None, "training images per class drawn (None = all 6000)")
    n_test: int | None = field(None, "test images per class (None = all 1000)")
    epochs: int = field(3, "SGD epochs per task")
    batch_size: int = field(64, "batch size (GPM's CIFAR protocol)")
    method: CUBERConfig = field(CUBERConfig(thresholds=(0.97,), threshold_step=0.003, n_samples=(24, 100, 125),
                                            eps_proj=0.5),
                                "GPM / TRGP / CUBER settings: GPM's CIFAR protocol (threshold 0.97 + 0.003 t; "
                                "samples 24 / 100 / 125 for conv1, conv2, fc) and TRGP's CIFAR eps_1 = 0.5")
    width: int = field(16, "channels of the first conv (second has 2x)")

    def __post_init__(self):
        super().__post_init__()
        if self.n_tasks * self.classes_per_task != 10:
            raise UserError("split-fmnist needs n_tasks * classes_per_task == 10")


@register_experiment(
    "cuber-split-fmnist", config=SplitConfig, reference="gpm", metrics=METRICS, method="cuber", primary="bwt",
    description="Split Fashion-MNIST 5x2 classes, multi-head CNN (conv GPM via im2col, BN without running stats)",
    profiles={"quick": {"seeds": 2, "n_train": 300, "n_test": 300, "epochs": 2, "arms": ("gpm", "trgp", "cuber")},
              "tiny": {"seeds": 1, "val_seeds": 1, "n_train": 20, "n_test": 20, "epochs": 1, "n_samples": (4, 4, 8),
                       "arms": ("gpm", "trgp", "cuber", "multitask")},
              # cpu: 1000 images per class, 3 epochs, 5 seeds (≈ 32 CPU-thread seconds per run on average:
              # 30 runs in 8 minutes with --jobs 2)
              "cpu": {"seeds": 5, "val_seeds": 1, "n_train": 1000, "n_test": 1000, "epochs": 3,
                      "ewc_grid": (10.0, 1000.0), "arms": ("finetune", "ewc", "gpm", "trgp", "cuber", "multitask")},
              "full": {"seeds": 5}},
    cpu_minutes={"cpu": 16},
    plot=plot_matrices,
)
def cuber_split_fmnist(cfg: SplitConfig, arm: str, seed: int, ctx) -> dict:
    return run_arm(cfg, arm, seed, ctx,
                   lambda c, s: split_stream(c.classes_per_task, c.n_train, c.n_test, c.val_frac, s, c.data_path,
                                             c.normalize),
                   lambda: MultiHeadCNN(cfg.n_tasks, cfg.classes_per_task, cfg.width), multihead_forward)


@dataclass(frozen=True)
class RotatedConfig(StreamConfig):
    """Rotated Fashion-MNIST (0, 8, ..., 72 degrees), few samples per task: a positively correlated stream."""

    arms: tuple[str, ...] = field(("finetune", "ewc", "gpm", "gpm_long", "trgp", "trgp_long", "cuber", "cuber_long",
                                   "multitask"), ARMS_HELP)
    n_train: int | None = field(1000, "training images per task (after the validation split)")
    n_test: int | None = field(2000, "test images per task")
    step_degrees: float = field(8.0, "rotation step between consecutive tasks")


@register_experiment(
    "cuber-rotated-fmnist", config=RotatedConfig, reference="gpm", metrics=METRICS, method="cuber", primary="bwt",
    cpu_minutes={"quick": 1.5, "cpu": 57, "cpu-long": 40},
    description="10 rotated Fashion-MNIST tasks (0..72 deg, 1000 images each), MLP without bias: "
                "can CUBER turn GPM's no-forgetting into positive backward transfer?",
    # quick: 5 tasks spanning 0-64 degrees, one epoch at lr 0.05 (demo, not the protocol)
    profiles={"quick": {"seeds": 2, "val_seeds": 1, "n_tasks": 5, "n_test": 1000, "epochs": 1, "lr": 0.05,
                        "step_degrees": 16.0, "ewc_grid": (10.0, 1000.0),
                        "arms": ("finetune", "ewc", "gpm", "gpm_long", "trgp", "cuber", "multitask")},
              # cpu: the short-budget arms on 20 seeds; cpu-long: the matched 15-epoch arms (> 1 CPU-min
              # per run) on 10 seeds. Arms and seeds are not part of the config hash: one table.
              "cpu": {"seeds": 20, "val_seeds": 2,
                      "arms": ("finetune", "ewc", "gpm", "trgp", "cuber", "cuber_val")},
              "cpu-long": {"seeds": 10, "val_seeds": 2, "arms": LONG},
              "tiny": {"seeds": 1, "val_seeds": 1, "n_tasks": 3, "n_train": 100, "n_test": 100, "epochs": 1, "lr": 0.05,
                       "step_degrees": 16.0, "ewc_grid": (10.0, 1000.0), "arms": ("finetune", "gpm", "cuber")},
              "full": {"seeds": 20, "arms": _ALL + LONG}},
    plot=plot_matrices, extra_arms=_ALL + LONG,
)
def cuber_rotated_fmnist(cfg: RotatedConfig, arm: str, seed: int, ctx) -> dict:
    return run_arm(cfg, arm, seed, ctx,
                   lambda c, s: rotated_stream(c.n_tasks, c.step_degrees, c.n_train, c.n_test, c.val_frac, s,
                                               c.data_path, c.normalize), _mlp)


@dataclass(frozen=True)
class ChunksConfig(StreamConfig):
    """One 10-class Fashion-MNIST problem in disjoint chunks, one head: the mechanism check for Regime 3."""

    arms: tuple[str, ...] = field(_ALL, ARMS_HELP)
    n_tasks: int = field(5, "chunks (5-10)")
    n_train: int | None = field(500, "training images per chunk (after the validation split)")
    n_test: int | None = field(2000, "test images (the same 10-class test set for every chunk)")
    epochs: int = field(3, "SGD epochs per chunk (a fixed budget)")
    lr: float = field(0.05, "SGD learning rate")


@register_experiment(
    "cuber-chunks-fmnist", config=ChunksConfig, reference="gpm", metrics=METRICS, method="cuber", primary="bwt",
    cpu_minutes={"quick": 0.2, "cpu": 29},
    description="one 10-class Fashion-MNIST problem in 5 disjoint 500-image chunks, one head, fixed budget: "
                "every pair positively correlated, so a working CUBER moves BWT from GPM's towards finetune's",
    profiles={"quick": {"seeds": 2, "val_seeds": 1, "n_train": 200, "n_test": 500, "epochs": 1,
                        "ewc_grid": (10.0, 1000.0), "arms": ("finetune", "gpm", "cuber")},
              "tiny": {"seeds": 1, "val_seeds": 1, "n_train": 60, "n_test": 50, "epochs": 1, "ewc_grid": (1.0, 100.0),
                       "arms": ("finetune", "ewc", "gpm", "cuber", "cuber_backward")},
              "cpu": {"seeds": 20}, "full": {"seeds": 30, "n_tasks": 10}},
    plot=plot_matrices,
)
def cuber_chunks_fmnist(cfg: ChunksConfig, arm: str, seed: int, ctx) -> dict:
    return run_arm(cfg, arm, seed, ctx,
                   lambda c, s: chunks_stream(c.n_tasks, c.n_train, c.n_test, c.val_frac, s, c.data_path,
                                              c.normalize), _mlp)


@dataclass(frozen=True)
class PairsConfig(SplitConfig):
    """Binary Fashion-MNIST tasks that share a class, multi-head CNN, trained to convergence (GPM CIFAR protocol)."""

    arms: tuple[str, ...] = field(_ALL, ARMS_HELP)
    n_tasks: int = field(6, "tasks: the first n_tasks of SHARED_PAIRS (T-shirt/shirt, shirt/pullover, ...)")
    n_train: int | None = field(200, "training images per class drawn (before the validation split)")
    n_test: int | None = field(250, "test images per class")
    val_frac: float = field(0.2, "held-out validation fraction of each task's draw (early stopping)")
    epochs: int = field(30, "maximum epochs per task")
    patience: int = field(2, "epochs without lower validation loss before the lr is halved (GPM CIFAR: 6)")
    lr_min: float = field(5e-3, "stop once the lr falls below this (GPM CIFAR: 1e-5 from lr 0.01)")
    lr: float = field(0.05, "SGD learning rate")
    batch_size: int = field(32, "batch size")
    method: CUBERConfig = field(CUBERConfig(thresholds=(0.97,), threshold_step=0.0, n_samples=(24, 100, 125),
                                            eps_proj=0.5),
                                "GPM / TRGP / CUBER settings: GPM's CIFAR threshold 0.97 without the per-task "
                                "increase (the tasks are few and small), TRGP's CIFAR eps_1 = 0.5")

    def __post_init__(self):
        StreamConfig.__post_init__(self)
        if not 2 <= self.n_tasks <= len(SHARED_PAIRS):
            raise UserError(f"n_tasks must lie in [2, {len(SHARED_PAIRS)}] for the shared-pair stream")


@register_experiment(
    "cuber-pairs-fmnist", config=PairsConfig, reference="gpm", metrics=METRICS, method="cuber", primary="bwt",
    cpu_minutes={"quick": 0.3, "cpu": 78},
    description="6 binary Fashion-MNIST tasks sharing a class (T-shirt/shirt, shirt/pullover, ...), 320 training "
                "images each, multi-head CNN, validation early stopping with best-model restore",
    profiles={"quick": {"seeds": 2, "val_seeds": 1, "n_tasks": 3, "n_train": 60, "n_test": 100, "epochs": 4,
                        "ewc_grid": (10.0, 1000.0), "arms": ("gpm", "trgp", "cuber")},
              "tiny": {"seeds": 1, "val_seeds": 1, "n_tasks": 2, "n_train": 20, "n_test": 20, "epochs": 3,
                       "patience": 1, "n_samples": (4, 4, 8), "ewc_grid": (10.0, 1000.0),
                       "arms": ("gpm", "trgp", "cuber", "cuber_val")},
              "cpu": {"seeds": 20, "val_seeds": 2, "arms": ("finetune", "ewc", "gpm", "trgp", "cuber", "cuber_val")},
              "full": {"seeds": 30}},
    plot=plot_matrices,
)
def cuber_pairs_fmnist(cfg: PairsConfig, arm: str, seed: int, ctx) -> dict:
    return run_arm(cfg, arm, seed, ctx,
                   lambda c, s: split_stream(2, c.n_train, c.n_test, c.val_frac, s, c.data_path, c.normalize,
                                             list(SHARED_PAIRS[: c.n_tasks])),
                   lambda: MultiHeadCNN(cfg.n_tasks, 2, cfg.width), multihead_forward)
