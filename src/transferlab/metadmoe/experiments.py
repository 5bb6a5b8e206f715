"""Experiments `metadmoe-rotated-fmnist` and `metadmoe-corrupted-fmnist`: leave-one-domain-out test-time adaptation.

Protocol (DomainBed-style, paper Sec. 4): six Fashion-MNIST domains, each held out in turn. On the
five sources we train, per fold: the ERM student (stage 3), one expert per source domain (stage 1),
the aggregator (stage 2), and Meta-DMoE variants (stage 4). On the held-out domain's test shard,
every method sees consecutive unlabeled batches of `support_size` images; each batch adapts from
the source weights (episodic) and is then predicted. Learning rates of adaptation (Meta-DMoE's
inner step, TENT) are chosen on the sources' validation shards only: for a source domain d we
adapt with expert d masked out, imitating an unseen domain. The held-out domain is never used to choose.
Stage results are cached per (seed, fold) beside the run folders, so all arms of a seed are paired.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.config import field
from ..core.errors import UserError
from ..core.io import atomic_torch_save
from ..core.registry import register_experiment
from ..nn import SmallCNN
from .aggregator import Aggregator
from .baselines import BNAdapt, Tent
from .config import MetaDMoEConfig
from .domains import make_domains
from .model import MetaDMoE

ARMS = ("erm", "bn_adapt", "tent", "metadmoe", "no_mask", "first_order", "avg_experts", "adapt_no_meta")
# meta-trained variants: config overrides of MetaDMoEConfig
VARIANTS = {"metadmoe": {}, "no_mask": {"mask_own_expert": False}, "first_order": {"first_order": True},
            "avg_experts": {"teacher": "average"}}


@dataclass(frozen=True)
class MetaDMoEExperimentConfig:
    """Leave-one-domain-out test-time adaptation on Fashion-MNIST domains (Meta-DMoE, paper Sec. 4.1-4.2)."""

    arms: tuple[str, ...] = field(ARMS, "arms: " + ", ".join(ARMS))
    seeds: int = field(5, "number of seeds (data shards, corruption severities and inits all change)")
    family: str = field("rotated", "domain family: 'rotated' (0..75 deg) or 'corrupted' (clean + 5 corruptions)")
    rotation_mode: str = field("bilinear", "rotation interpolation: 'bilinear' (DomainBed) or 'nearest' (no blur)")
    held_out: tuple[int, ...] = field((0, 1, 2, 3, 4, 5), "domains held out in turn (one fold each)")
    n_train: int = field(2000, "training images per domain (disjoint shards of the Fashion-MNIST train split)")
    n_val: int = field(320, "validation images per source domain (choose learning rates here, never on the target)")
    n_test: int = field(1024, "test images of the held-out domain (from the Fashion-MNIST test split)")
    width: int = field(16, "SmallCNN width (experts and student share the architecture)")
    hidden: int = field(64, "SmallCNN feature size D (= aggregator dim)")
    heads: int = field(4, "aggregator attention heads (must divide hidden)")
    support_size: int = field(64, "unlabeled target images per adaptation batch (also the meta-training support)")
    query_size: int = field(64, "labeled query images per meta-training episode")
    inner_lrs: tuple[float, ...] = field((1e-3, 3e-3, 1e-2), "candidate inner-step lrs alpha; best on source "
                                                             "validation (each candidate is meta-trained)")
    tent_lrs: tuple[float, ...] = field((1e-3, 1e-2, 1e-1), "candidate TENT Adam lrs; best on source validation")
    student_epochs: int = field(4, "ERM epochs of the student on all sources")
    expert_epochs: int = field(2, "fine-tuning epochs of each expert on its own domain")
    aggregator_epochs: int = field(5, "cross-entropy pre-training epochs of the aggregator")
    meta_epochs: int = field(3, "meta-training epochs")
    episodes_per_epoch: int = field(150, "meta-training episodes per epoch")
    outer_lr: float = field(1e-4, "meta-training Adam lr of the student (beta)")
    aggregator_meta_lr: float = field(1e-4, "meta-training Adam lr of the aggregator")
    aggregator_lr: float = field(1e-4, "aggregator pre-training Adam lr (official 1e-6..1e-5: stays near init)")
    expert_init: str = field("student", "[reconstructed] experts start from the ERM student ('student') or scratch")
    data_path: str | None = field(None, "folder with the Fashion-MNIST IDX files (default: Debian package)")

    def __post_init__(self):
        if self.family not in ("rotated", "corrupted"):
            raise UserError(f"family must be 'rotated' or 'corrupted', got {self.family!r}")
        if not self.held_out or any(not 0 <= d < 6 for d in self.held_out) or len(set(self.held_out)) < len(
                self.held_out):
            raise UserError(f"held_out must list distinct domain indices in 0..5, got {self.held_out}")
        if not self.inner_lrs or not self.tent_lrs:
            raise UserError("inner_lrs and tent_lrs must each list at least one learning rate")
        if self.n_train < self.support_size + self.query_size:
            raise UserError("n_train must be at least support_size + query_size (one meta-training episode)")
        if self.n_val < 2 or self.n_test < 2:
            raise UserError("n_val and n_test must be at least 2 (batch statistics need two images)")


@dataclass(frozen=True)
class CorruptedConfig(MetaDMoEExperimentConfig):
    """Corrupted Fashion-MNIST: clean, Gaussian noise, blur, low contrast, inversion, colour tint (3 channels)."""

    family: str = field("corrupted", "domain family: 'rotated' (0..75 deg) or 'corrupted' (clean + 5 corruptions)")


def _method_config(cfg, variant: str, alpha: float) -> MetaDMoEConfig:
    base = MetaDMoEConfig(
        inner_lr=alpha, student_epochs=cfg.student_epochs, expert_epochs=cfg.expert_epochs,
        aggregator_epochs=cfg.aggregator_epochs, aggregator_lr=cfg.aggregator_lr, meta_epochs=cfg.meta_epochs,
        episodes_per_epoch=cfg.episodes_per_epoch, support_size=cfg.support_size, query_size=cfg.query_size,
        outer_lr=cfg.outer_lr, aggregator_meta_lr=cfg.aggregator_meta_lr, expert_init=cfg.expert_init)
    return dataclasses.replace(base, **VARIANTS.get(variant, {}))


def _new_model(cfg, mcfg: MetaDMoEConfig) -> MetaDMoE:
    c = 1 if cfg.family == "rotated" else 3
    cnn = lambda: SmallCNN(10, in_channels=c, width=cfg.width, hidden=cfg.hidden)  # noqa: E731
    return MetaDMoE([cnn() for _ in range(5)], Aggregator(cfg.hidden, heads=cfg.heads, num_classes=10), cnn(), mcfg,
                    input_shape=(c, 28, 28))


def _base(cfg, seed, fold, sources, engine) -> dict:
    """Stages 3, 1, 2 for one (seed, fold), cached so every arm of this seed shares them."""
    path = engine.run_dir.parent / f"base-seed{seed}-fold{fold}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(seed * 100 + fold)
    m = _new_model(cfg, _method_config(cfg, "metadmoe", cfg.inner_lrs[0]))
    prog = engine.progress
    m.pretrain_student(sources, seed=seed, progress=prog)
    m.train_experts(sources, seed=seed, progress=prog)
    m.pretrain_aggregator(sources, seed=seed, progress=prog)
    state = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    atomic_torch_save(state, path)
    return state


def _meta(cfg, seed, fold, variant, alpha, sources, base, engine) -> tuple[MetaDMoE, list]:
    """Stage 4 of one variant, cached; per-epoch checkpoints let a killed run resume mid-training."""
    mcfg = _method_config(cfg, variant, alpha)
    m = _new_model(cfg, mcfg)
    m.load_state_dict(base)
    for e in m.experts:
        e.requires_grad_(False)
    path = engine.run_dir.parent / f"meta-{variant}-a{alpha:g}-seed{seed}-fold{fold}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        m.load_state_dict(blob["model"])
        return m, blob["history"]
    partial = path.with_suffix(".partial")
    start, opts = 0, None
    if partial.exists():  # resume: model, optimisers and history of the last finished epoch
        blob = torch.load(partial, map_location="cpu", weights_only=False)
        m.load_state_dict(blob["model"])
        m.history = blob["history"]
        start = blob["epoch"]
        opts = m.meta_optimizers()
        for o, s in zip(opts, blob["opts"]):
            o.load_state_dict(s)

    def save(epoch, optimizers):
        atomic_torch_save({"model": m.state_dict(), "history": m.history, "epoch": epoch + 1,
                           "opts": [o.state_dict() for o in optimizers]}, partial)

    m.meta_train(sources, seed=seed + 1000 * fold, progress=engine.progress, start_epoch=start, optimizers=opts,
                 on_epoch_end=save)
    atomic_torch_save({"model": m.state_dict(), "history": m.history}, path)
    partial.unlink(missing_ok=True)
    return m, m.history


@torch.no_grad()
def _episodic_acc(predict, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    """Accuracy when each consecutive batch of `bs` images is adapted to and then predicted."""
    chunks = list(torch.arange(len(x)).split(bs))
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # batch statistics need two images
        chunks[-2:] = [torch.cat(chunks[-2:])]
    correct = sum((predict(x[b]).argmax(-1) == y[b]).sum().item() for b in chunks)
    return correct / len(x)


def _val_acc(make_predict, vals, bs: int) -> float:
    """Mean episodic accuracy over source validation shards; `make_predict(d)` masks expert d if it can."""
    return sum(_episodic_acc(make_predict(d), x, y, bs) for d, (x, y) in enumerate(vals)) / len(vals)


def _adapt_predict(m: MetaDMoE, exclude):
    def predict(xb):
        return m.adapt(xb, exclude_expert=exclude).predict(xb)
    return predict


def run_fold(cfg, arm: str, seed: int, fold: int, domains, engine) -> dict:
    """Held-out accuracy of one arm on domain `fold`, plus what was chosen on source validation."""
    src = [d for d in range(6) if d != fold]
    sources = [domains[d][0] for d in src]
    vals = [domains[d][1] for d in src]
    xt, yt = domains[fold][2]
    base = _base(cfg, seed, fold, sources, engine)
    bs = cfg.support_size
    out = {}
    # choices: candidate hyperparameter -> function(d) giving a batch predictor; d = masked source domain
    # on validation, None at test time (the held-out domain has no expert, so none is masked)
    if arm in ("erm", "bn_adapt", "tent"):
        m = _new_model(cfg, _method_config(cfg, "metadmoe", cfg.inner_lrs[0]))
        m.load_state_dict(base)
        student = m.student.eval()
        if arm == "erm":
            choices = {None: lambda d: student}
        elif arm == "bn_adapt":
            bn = BNAdapt(student)
            choices = {None: lambda d: bn.predict}
        else:
            def tent_predict(lr):
                tent = Tent(student, lr=lr)  # episodic: every batch starts from the ERM student

                def predict(xb):
                    tent.update(xb)
                    return tent.predict(xb)
                return predict
            choices = {lr: (lambda d, lr=lr: tent_predict(lr)) for lr in cfg.tent_lrs}
    else:
        choices, models = {}, {}
        for alpha in cfg.inner_lrs:
            if arm == "adapt_no_meta":
                m = _new_model(cfg, _method_config(cfg, "metadmoe", alpha))
                m.load_state_dict(base)
            else:
                m, hist = _meta(cfg, seed, fold, arm, alpha, sources, base, engine)
                out[f"meta_loss_before_d{fold}_a{alpha:g}"] = hist[-1]["loss_before"] if hist else float("nan")
                out[f"meta_loss_after_d{fold}_a{alpha:g}"] = hist[-1]["loss_after"] if hist else float("nan")
            models[alpha] = m
            choices[alpha] = (lambda d, m=m: _adapt_predict(m, None if d is None else m.expert_of(d)))
    scored = {k: _val_acc(make, vals, bs) for k, make in choices.items()}
    best = max(scored, key=lambda k: scored[k])  # ties: the first listed candidate
    test_acc = _episodic_acc(choices[best](None), xt, yt, bs)
    if arm in VARIANTS:  # control: the meta-trained student without its adaptation step
        out[f"acc_noadapt_d{fold}"] = 100 * _episodic_acc(lambda xb: models[best].predict(xb), xt, yt, bs)
    out.update({f"acc_d{fold}": 100 * test_acc, f"val_acc_d{fold}": 100 * scored[best]})
    if len(scored) > 1:  # every candidate's source-validation score, for the record
        out.update({f"val_acc_d{fold}_lr{k:g}": 100 * v for k, v in scored.items()})
    if best is not None:
        out[f"lr_d{fold}"] = best
    return out


def _run(cfg, arm: str, seed: int, engine) -> dict:
    names, domains = make_domains(cfg.family, seed, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_path,
                                  cfg.rotation_mode)
    ckpt = engine.load_checkpoint() or {"metrics": {}, "folds": []}
    metrics = ckpt["metrics"]
    for fold in cfg.held_out:
        if fold in ckpt["folds"]:
            continue  # finished before an interruption
        engine.print0(f"  fold {fold} (held out: {names[fold]})")
        metrics.update(run_fold(cfg, arm, seed, fold, domains, engine))
        ckpt["folds"].append(fold)
        engine.save_checkpoint({"metrics": metrics, "folds": ckpt["folds"]})
    metrics["acc_avg"] = sum(metrics[f"acc_d{d}"] for d in cfg.held_out) / len(cfg.held_out)
    if arm in VARIANTS:
        metrics["acc_noadapt_avg"] = sum(metrics[f"acc_noadapt_d{d}"] for d in cfg.held_out) / len(cfg.held_out)
    return metrics


def _plot(rows, cfg, out_dir):
    from .plots import plot_results

    return plot_results(rows, cfg, out_dir)


METRICS = ("acc_avg",) + tuple(f"acc_d{d}" for d in range(6)) + ("acc_noadapt_avg",)
# quick: 2 of 6 folds, 1 seed, short training, one inner lr (1e-3, chosen on source validation in a pilot:
# seed 0, fold 0, candidates 1e-3 / 3e-3 / 1e-2 gave 77.7 / 77.5 / 77.0 % source-validation accuracy)
QUICK = {"seeds": 1, "held_out": (0, 5), "n_train": 600, "n_val": 128, "n_test": 512, "student_epochs": 2,
         "expert_epochs": 1, "aggregator_epochs": 3, "meta_epochs": 1, "episodes_per_epoch": 40,
         "query_size": 32, "inner_lrs": (1e-3,)}
# cpu: the quick sizes on all six folds and five seeds (what fits a shared 2-core machine in about an hour)
CPU = {**QUICK, "seeds": 5, "held_out": (0, 1, 2, 3, 4, 5)}
FULL = {"seeds": 5}
PROFILES = {"quick": QUICK, "cpu": CPU, "full": FULL}


@register_experiment(
    "metadmoe-rotated-fmnist", config=MetaDMoEExperimentConfig, reference="erm", metrics=METRICS,
    description="Meta-DMoE test-time adaptation on held-out rotations of Fashion-MNIST vs ERM, BN-adapt, TENT",
    profiles=PROFILES, plot=_plot)
def metadmoe_rotated(cfg, arm, seed, engine):
    return _run(cfg, arm, seed, engine)


@register_experiment(
    "metadmoe-corrupted-fmnist", config=CorruptedConfig, reference="erm", metrics=METRICS,
    description="Meta-DMoE test-time adaptation on held-out corruptions of Fashion-MNIST vs ERM, BN-adapt, TENT",
    profiles=PROFILES, plot=_plot)
def metadmoe_corrupted(cfg, arm, seed, engine):
    return _run(cfg, arm, seed, engine)


