"""Experiments `metadmoe-{rotated,corrupted,mixed}-fmnist`: leave-one-domain-out test-time adaptation.

Protocol (DomainBed-style, paper Sec. 4): six Fashion-MNIST domains, each held out in turn. On the
five sources we train, per (seed, fold): the ERM student (stage 3) and one expert per source domain
(stage 1), each early-stopped on its validation data, then the aggregator (stage 2) and the Meta-DMoE
variants (stage 4). Hyperparameters of adaptation (Meta-DMoE's inner lr, TENT's lr) are chosen on the
family's three validation domains, which are neither sources nor test folds; the held-out domain is
never used to choose. At test time the held-out domain's test shard arrives as unlabeled batches of
`support_size` images (protocol.py). Stages 1-3 are shared artifacts of the run context per (seed,
fold), so every arm of a seed starts from the same student, experts and aggregator; each arm's
meta-training is a resumable stage of its own run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import field
from ..core.engine import rng_state, set_rng_state
from ..core.errors import UserError
from ..core.registry import Figures, register_experiment
from ..nn import SmallCNN
from . import diagnostics as dg
from .aggregator import Aggregator
from .config import MetaDMoEConfig
from .domains import make_domains
from .model import MetaDMoE
from .protocol import PROTOCOLS, TENT_MODES, bn_adapt_accuracy, metadmoe_accuracy, static_accuracy, tent_accuracy

ARMS = ("erm", "erm_extra", "bn_adapt", "arm_bn", "tent", "metadmoe", "no_mask", "first_order", "avg_experts",
        "adapt_no_meta", "oracle")
# meta-trained variants: config overrides of MetaDMoEConfig
VARIANTS = {"metadmoe": {}, "no_mask": {"mask_own_expert": False}, "first_order": {"first_order": True},
            "avg_experts": {"teacher": "average"}}


@dataclass(frozen=True)
class MetaDMoEExperimentConfig:
    """Leave-one-domain-out test-time adaptation on Fashion-MNIST domains (Meta-DMoE, paper Sec. 4.1-4.2)."""

    arms: tuple[str, ...] = field(ARMS, "arms: " + ", ".join(ARMS))
    seeds: int = field(5, "number of seeds (data shards, corruption severities and inits all change)")
    family: str = field("rotated", "domain family: 'rotated' (0..75 deg), 'corrupted' (clean + 5 corruptions) or "
                                   "'mixed' (clean, rot60, noise, blur, inversion, tint: domains of different kinds)")
    rotation_mode: str = field("bilinear", "rotation interpolation: 'bilinear' (DomainBed) or 'nearest' (no blur)")
    held_out: tuple[int, ...] = field((0, 1, 2, 3, 4, 5), "domains held out in turn (one fold each)")
    n_train: int = field(2000, "training images per domain (disjoint shards of the Fashion-MNIST train split)")
    n_val: int = field(320, "validation images per domain (early stopping of student and experts)")
    n_valdom: int = field(512, "images per validation domain (choosing adaptation learning rates)")
    n_test: int = field(1024, "test images of the held-out domain (from the Fashion-MNIST test split)")
    width: int = field(16, "SmallCNN width (experts and student share the architecture)")
    hidden: int = field(64, "SmallCNN feature size D (= aggregator dim)")
    heads: int = field(4, "aggregator attention heads (must divide hidden)")
    inner_lrs: tuple[float, ...] = field((3e-4, 1e-3, 3e-3), "candidate inner-step lrs alpha; best on the "
                                                             "validation domains (each candidate is meta-trained)")
    tent_lrs: tuple[float, ...] = field((1e-4, 1e-3, 1e-2), "candidate TENT Adam lrs; best on the validation domains")
    method: MetaDMoEConfig = field(
        MetaDMoEConfig(student_epochs=20, expert_epochs=20, patience=3, meta_epochs=4, episodes_per_epoch=250,
                       query_size=32),
        "the Meta-DMoE training procedure (MetaDMoEConfig; `--set method.x=...` or `--set x=...`). Each arm "
        "replaces inner_lr by its candidate from inner_lrs, and the ablation arms set first_order / "
        "mask_own_expert / teacher. Defaults here: 20 student / expert epochs with patience 3, 4 x 250 "
        "meta-training episodes, support 64 : query 32 (2:1 as the official Camelyon17 config, 64 of 96)")
    protocol: str = field("per_domain", "test-time protocol of Meta-DMoE: 'per_domain' (official: adapt once on the "
                                        "domain's first unlabeled batch, predict the whole domain) or 'per_batch'")
    tent_mode: str = field("online", "TENT: 'online' (official: adapts across a domain's batches, reset per "
                                     "domain) or 'episodic' (reset before every batch)")
    selection: str = field("val_domains", "where learning rates are chosen: 'val_domains' (the family's validation "
                                          "domains, all experts) or 'source_val' (source shards, own expert masked)")
    data_path: str | None = field(None, "folder with the Fashion-MNIST IDX files (default: Debian package)")

    def __post_init__(self):
        if self.family not in ("rotated", "corrupted", "mixed"):
            raise UserError(f"family must be 'rotated', 'corrupted' or 'mixed', got {self.family!r}")
        if not self.held_out or any(not 0 <= d < 6 for d in self.held_out) or len(set(self.held_out)) < len(
                self.held_out):
            raise UserError(f"held_out must list distinct domain indices in 0..5, got {self.held_out}")
        if not self.inner_lrs or not self.tent_lrs:
            raise UserError("inner_lrs and tent_lrs must each list at least one learning rate")
        if self.n_train < self.method.support_size + self.method.query_size:
            raise UserError("n_train must be at least support_size + query_size (one meta-training episode)")
        if self.n_val < 2 or self.n_test < 2 or self.n_valdom < 2:
            raise UserError("n_val, n_valdom and n_test must be at least 2 (batch statistics need two images)")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise UserError(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
        for name, value, allowed in (("protocol", self.protocol, PROTOCOLS), ("tent_mode", self.tent_mode, TENT_MODES),
                                     ("selection", self.selection, ("val_domains", "source_val"))):
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class CorruptedConfig(MetaDMoEExperimentConfig):
    """Corrupted Fashion-MNIST: clean, Gaussian noise, blur, low contrast, inversion, colour tint (3 channels)."""

    family: str = field("corrupted", "domain family: 'rotated', 'corrupted' or 'mixed'")


@dataclass(frozen=True)
class MixedConfig(MetaDMoEExperimentConfig):
    """Mixed Fashion-MNIST: clean, 60 deg rotation, noise, blur, inversion, colour tint (3 channels)."""

    family: str = field("mixed", "domain family: 'rotated', 'corrupted' or 'mixed'")


def _method_config(cfg, variant: str, alpha: float) -> MetaDMoEConfig:
    """The arm's MetaDMoEConfig: the experiment's, with inner lr `alpha` and the variant's overrides."""
    return dataclasses.replace(cfg.method, inner_lr=alpha, **VARIANTS.get(variant, {}))


def _cnn(cfg) -> SmallCNN:
    return SmallCNN(10, in_channels=1 if cfg.family == "rotated" else 3, width=cfg.width, hidden=cfg.hidden)


def _new_model(cfg, mcfg: MetaDMoEConfig, state: dict | None = None) -> MetaDMoE:
    c = 1 if cfg.family == "rotated" else 3
    m = MetaDMoE([_cnn(cfg) for _ in range(5)], Aggregator(cfg.hidden, heads=cfg.heads, num_classes=10), _cnn(cfg),
                 mcfg, input_shape=(c, 28, 28))
    if state is not None:
        m.load_state_dict(state)
        for e in m.experts:
            e.requires_grad_(False)
    return m


BASE_FIELDS = ("family", "rotation_mode", "n_train", "n_val", "width", "hidden", "heads", "data_path")
# the MetaDMoEConfig fields that stages 1-3 read
BASE_METHOD_FIELDS = ("student_epochs", "student_lr", "expert_epochs", "expert_lr", "patience", "batch_size",
                      "aggregator_epochs", "aggregator_lr", "expert_init", "teacher")


def _base(cfg, seed, fold, sources, vals, ctx) -> dict:
    """Stages 3, 1, 2 for one (seed, fold), built once and shared by every arm of this seed."""
    def build():
        torch.manual_seed(seed * 100 + fold)
        m = _new_model(cfg, _method_config(cfg, "metadmoe", cfg.inner_lrs[0]))
        m.pretrain_student(sources, seed=seed, progress=ctx.progress, val=vals)
        m.train_experts(sources, seed=seed, progress=ctx.progress, val=vals)
        m.pretrain_aggregator(sources, seed=seed, progress=ctx.progress)
        return {"state": {k: v.detach().cpu() for k, v in m.state_dict().items()}, "fit_log": m.fit_log}

    # keyed by what stages 1-3 depend on, so runs differing only in adaptation/protocol options share them
    key = {**{f: getattr(cfg, f) for f in BASE_FIELDS}, **{f: getattr(cfg.method, f) for f in BASE_METHOD_FIELDS}}
    # the arm continues with the same random stream whether this process builds the stages or loads them
    rng = rng_state()
    base = ctx.shared(f"base-fold{fold}", build, key={"metadmoe-base": key})
    set_rng_state(rng)
    return base


def _meta(cfg, seed, fold, variant, alpha, sources, base, ctx, run_state: dict) -> MetaDMoE:
    """Stage 4 of one variant at inner lr `alpha`: a resumable stage of this run.

    After every meta-epoch the run's checkpoint also holds the model, optimisers, history and curve
    (under "meta"), so a killed run resumes mid-training; `run_state` is the rest of that checkpoint.
    """
    m = _new_model(cfg, _method_config(cfg, variant, alpha), base["state"])
    tag = f"meta-{variant}-a{alpha:g}-fold{fold}"

    def train() -> dict:
        start, opts = 0, None
        partial = run_state.get("meta")
        if partial is not None and partial["tag"] == tag:  # resume after the last finished epoch
            m.load_state_dict(partial["model"])
            m.history, m.curve, start = partial["history"], partial["curve"], partial["epoch"]
            opts = m.meta_optimizers(m.config.lr_decay ** start)
            for o, st in zip(opts, partial["opts"]):
                o.load_state_dict(st)

        def save(epoch, optimizers):
            ctx.save_checkpoint({**run_state, "meta": {
                "tag": tag, "model": m.state_dict(), "history": m.history, "curve": m.curve, "epoch": epoch + 1,
                "opts": [o.state_dict() for o in optimizers]}})

        m.meta_train(sources, seed=seed + 1000 * fold, progress=ctx.progress, start_epoch=start, optimizers=opts,
                     on_epoch_end=save)
        return {"model": m.state_dict(), "history": m.history, "curve": m.curve}

    blob = ctx.stage(tag, train)
    m.load_state_dict(blob["model"])  # (after training: the model's own weights, a no-op copy)
    m.history, m.curve = blob["history"], blob["curve"]
    return m


def _erm_extra(cfg, seed, fold, sources, base, batch_stats: bool | None = None) -> torch.nn.Module:
    """The ERM student given as many extra labeled Adam steps as meta-training has episodes.

    Same sampler (one source domain per step), the query's labeled images, the outer lr and its decay,
    and the student mode of meta-training: only the distillation step is missing. `batch_stats=True`
    trains with BN in train mode on these single-domain batches (ARM-BN style: the network learns to
    classify with one domain's batch statistics, which is what BN-adapt gives it at test time).
    """
    m = _new_model(cfg, _method_config(cfg, "metadmoe", cfg.inner_lrs[0]), base["state"])
    s, mc = m.student, m.config
    train_bn = mc.train_mode == "train" if batch_stats is None else batch_stats
    opt = torch.optim.Adam(s.parameters(), lr=mc.outer_lr)
    for epoch in range(mc.meta_epochs):
        for _, xq, yq, _ in m.episodes(sources, epoch, seed + 1000 * fold):
            s.train(train_bn)
            loss = F.cross_entropy(s.head(s.features(xq)), yq)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for g in opt.param_groups:
            g["lr"] *= mc.lr_decay
    return s.eval()


def _oracle_expert(cfg, seed, fold, domains, base) -> torch.nn.Module:
    """An expert trained on the held-out domain itself (its train shard, early-stopped on its val shard)."""
    m = _new_model(cfg, _method_config(cfg, "metadmoe", cfg.inner_lrs[0]), base["state"])
    oracle = MetaDMoE([_cnn(cfg)], None, m.student, dataclasses.replace(m.config, teacher="average"),
                      input_shape=m.input_shape, student_pretrained=True)
    oracle.train_experts([domains[fold][0]], seed=seed + 77, val=[domains[fold][1]])
    return oracle.experts[0].eval()


def _choose(ctx, name, candidates, fit, scorer, sel_sets) -> tuple:
    """(best candidate, its fitted object, {candidate: score}): best mean accuracy over the selection sets.

    Ties go to the first listed; the candidates and scores are recorded in the run's results line.
    """
    best, fitted = ctx.choose_on_validation(
        name, candidates, fit=fit, score=lambda f: sum(scorer(f, d, x, y) for d, (x, y) in sel_sets) / len(sel_sets))
    return best, fitted, dict(zip(candidates, ctx.choices[name]["scores"]))


def _base_diagnostics(cfg, fold, m: MetaDMoE, domains, src, fit_log) -> dict:
    """Per fold: expert x domain matrix, ensemble, teacher through both heads, ERM-student distance."""
    xt, yt = domains[fold][2]
    evals = [domains[d][2] if d == fold else domains[d][1] for d in range(6)]  # held-out: its test shard
    out = {f"expert_matrix_d{fold}": [[100 * a for a in row] for row in dg.expert_matrix(m, evals)],
           f"expert_domains_d{fold}": src,
           f"ensemble_acc_d{fold}": 100 * dg.ensemble_accuracy(m, xt, yt),
           f"teacher_acc_d{fold}": 100 * dg.teacher_accuracy(m, xt, yt, head="aggregator"),
           f"teacher_shead_acc_d{fold}": 100 * dg.teacher_accuracy(m, xt, yt, head="student"),
           f"mse_teacher_d{fold}": dg.feature_mse(m, xt)["before"],
           f"student_epochs_d{fold}": fit_log["student"]["best_epoch"],
           f"expert_epochs_d{fold}": [fit_log[f"expert{k}"]["best_epoch"] for k in range(5)]}
    return out


def run_fold(cfg, arm: str, seed: int, fold: int, domains, valdoms, ctx, run_state: dict) -> dict:
    """Held-out accuracy of one arm on domain `fold`, its diagnostics, and what was chosen on validation."""
    src = [d for d in range(6) if d != fold]
    sources = [domains[d][0] for d in src]
    vals = [domains[d][1] for d in src]
    xt, yt = domains[fold][2]
    base = _base(cfg, seed, fold, sources, vals, ctx)
    bs = cfg.method.support_size
    # selection sets: (masked source index or None, (x, y)); the held-out domain is never among them
    sel = ([(None, xy) for xy in valdoms] if cfg.selection == "val_domains"
           else [(i, xy) for i, xy in enumerate(vals)])
    out: dict = {}

    def plain(variant="metadmoe", alpha=cfg.inner_lrs[0]):
        return _new_model(cfg, _method_config(cfg, variant, alpha), base["state"])

    if arm in ("erm", "erm_extra", "bn_adapt", "arm_bn", "tent"):
        student = (_erm_extra(cfg, seed, fold, sources, base) if arm == "erm_extra" else
                   _erm_extra(cfg, seed, fold, sources, base, batch_stats=True) if arm == "arm_bn" else
                   plain().student.eval())
        if arm in ("erm", "erm_extra"):
            acc = static_accuracy(student, xt, yt, bs)
            if arm == "erm":
                out.update(_base_diagnostics(cfg, fold, plain(), domains, src, base["fit_log"]))
        elif arm in ("bn_adapt", "arm_bn"):
            acc = bn_adapt_accuracy(student, xt, yt, bs)
        else:
            lr, _, scored = _choose(ctx, f"tent_lr_d{fold}", cfg.tent_lrs, lambda c: c,
                                    lambda c, d, x, y: tent_accuracy(student, x, y, bs, c, cfg.tent_mode), sel)
            acc = tent_accuracy(student, xt, yt, bs, lr, cfg.tent_mode)
            out.update({f"lr_d{fold}": lr, f"val_acc_d{fold}": 100 * scored[lr],
                        **{f"val_acc_d{fold}_lr{k:g}": 100 * v for k, v in scored.items()}})
        out[f"acc_d{fold}"] = 100 * acc
        return out

    target_fn = None
    if arm == "oracle":  # a bound, not a method: one step towards a target-trained expert, lr chosen on the target
        oracle = _oracle_expert(cfg, seed, fold, domains, base)
        out[f"oracle_expert_acc_d{fold}"] = 100 * static_accuracy(oracle, xt, yt, bs)

        def target_fn(xb):
            with torch.no_grad():
                return oracle.features(xb)

    def model(alpha):
        if arm in ("adapt_no_meta", "oracle"):
            return plain("metadmoe", alpha)
        return _meta(cfg, seed, fold, arm, alpha, sources, base, ctx, run_state)

    def score(m, d, x, y):
        return metadmoe_accuracy(m, x, y, bs, cfg.protocol, None if d is None else m.expert_of(d))[0]

    if arm == "oracle":  # the target's own test data picks the lr: an upper bound, not recorded as a choice
        sel_test = {a: metadmoe_accuracy(model(a), xt, yt, bs, cfg.protocol, target_fn=target_fn)
                    for a in cfg.inner_lrs}
        best = max(sel_test, key=lambda a: sel_test[a][0])
        acc, mse = sel_test[best]
        m = None
    else:
        best, m, scored = _choose(ctx, f"inner_lr_d{fold}", cfg.inner_lrs, model, score, sel)
        acc, mse = metadmoe_accuracy(m, xt, yt, bs, cfg.protocol)
        out.update({f"val_acc_d{fold}": 100 * scored[best],
                    **{f"val_acc_d{fold}_lr{k:g}": 100 * v for k, v in scored.items()}})
    out.update({f"acc_d{fold}": 100 * acc, f"lr_d{fold}": best, f"mse_before_d{fold}": mse["before"],
                f"mse_after_d{fold}": mse["after"]})
    if arm in VARIANTS:  # control: the meta-trained student without its step; and what its teacher knows
        out[f"acc_noadapt_d{fold}"] = 100 * static_accuracy(m.predict, xt, yt, bs)
        out[f"teacher_shead_acc_d{fold}"] = 100 * dg.teacher_accuracy(m, xt, yt, head="student")
        out[f"curve_d{fold}"] = [[c["episode"], c["loss_before"], c["loss_after"]] for c in m.curve]
        if m.history:
            out[f"meta_loss_before_d{fold}"] = m.history[-1]["loss_before"]
            out[f"meta_loss_after_d{fold}"] = m.history[-1]["loss_after"]
    return out


AVERAGED = ("acc", "acc_noadapt", "ensemble_acc", "teacher_acc", "teacher_shead_acc", "mse_before", "mse_after",
            "mse_teacher", "oracle_expert_acc")


def _run(cfg, arm: str, seed: int, ctx) -> dict:
    names, domains, valdoms = make_domains(cfg.family, seed, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_path,
                                           cfg.rotation_mode, n_valdom=cfg.n_valdom)
    valdoms = [xy for _, xy in valdoms]
    ckpt = ctx.load_checkpoint() or {"metrics": {}, "folds": []}
    metrics, folds = ckpt["metrics"], ckpt["folds"]
    for fold in cfg.held_out:
        if fold in folds:
            continue  # finished before an interruption
        ctx.print0(f"  fold {fold} (held out: {names[fold]})")
        run_state = {"metrics": metrics, "folds": folds}
        if "meta" in ckpt:  # a meta-training interrupted in this fold
            run_state["meta"] = ckpt.pop("meta")
        metrics.update(run_fold(cfg, arm, seed, fold, domains, valdoms, ctx, run_state))
        folds.append(fold)
        ctx.save_checkpoint({"metrics": metrics, "folds": folds})
    for key in AVERAGED:
        vals = [metrics[f"{key}_d{d}"] for d in cfg.held_out if f"{key}_d{d}" in metrics]
        if len(vals) == len(cfg.held_out):
            metrics[f"{key}_avg"] = sum(vals) / len(vals)
    return metrics


def _plot(rows, cfg: MetaDMoEExperimentConfig, out_dir) -> Figures:
    from .plots import plot_results

    return plot_results(rows, cfg, out_dir)


METRICS = ("acc_avg",) + tuple(f"acc_d{d}" for d in range(6)) + (
    "acc_noadapt_avg", "ensemble_acc_avg", "teacher_acc_avg", "teacher_shead_acc_avg", "mse_before_avg",
    "mse_after_avg")

def _method(**fields) -> dict:
    """Profile overrides of the nested MetaDMoEConfig, as `method.<field>` keys."""
    return {f"method.{k}": v for k, v in fields.items()}


# tiny (the conformance tests): one fold, a few images and steps, two candidates per lr choice
TINY = {"seeds": 1, "held_out": (5,), "n_train": 140, "n_val": 64, "n_valdom": 64, "n_test": 128,
        "inner_lrs": (1e-3, 1e-2), "tent_lrs": (1e-3, 1e-2),
        **_method(student_epochs=3, expert_epochs=2, patience=1, aggregator_epochs=1, meta_epochs=2,
                  episodes_per_epoch=3, log_every=3)}
# quick (the demo): 2 of 6 folds, 1 seed, short training, one inner lr
QUICK = {"seeds": 1, "held_out": (0, 5), "n_train": 600, "n_val": 128, "n_valdom": 128, "n_test": 512,
         "inner_lrs": (1e-3,), "tent_lrs": (1e-3,),
         **_method(student_epochs=2, expert_epochs=1, patience=0, aggregator_epochs=3, meta_epochs=1,
                   episodes_per_epoch=40, log_every=10)}
# cpu: sized for <= 2 h with --jobs 2 on 2 cores (docs/metadmoe.md gives the measured cost per (arm, seed))
CPU = {"seeds": 5, "held_out": (0, 3, 5), "n_train": 1500, "n_val": 256, "n_valdom": 256, "n_test": 1024,
       "inner_lrs": (3e-4, 1e-3, 3e-3), "tent_lrs": (1e-4, 1e-3, 1e-2),
       **_method(student_epochs=12, expert_epochs=12, patience=2, aggregator_epochs=3, meta_epochs=3,
                 episodes_per_epoch=150)}
FULL = {"seeds": 5}
# measured job-minutes, one thread per job (docs/metadmoe.md): quick 71 s; cpu 78 (corrupted) and 101 (rotated)
CPU_MINUTES = {"quick": 1.2, "cpu": 100}
PROFILES = {"tiny": TINY, "quick": QUICK, "cpu": CPU, "full": FULL}


def _register(name: str, config, what: str):
    @register_experiment(
        name, config=config, reference="erm", metrics=METRICS, profiles=PROFILES, plot=_plot, method="metadmoe",
        headline=("acc_avg", "acc_noadapt_avg", "teacher_shead_acc_avg"), cpu_minutes=CPU_MINUTES,
        description=f"Meta-DMoE test-time adaptation on held-out {what} of Fashion-MNIST vs ERM, BN-adapt, TENT")
    def experiment(cfg, arm, seed, ctx):
        return _run(cfg, arm, seed, ctx)

    return experiment


metadmoe_rotated = _register("metadmoe-rotated-fmnist", MetaDMoEExperimentConfig, "rotations")
metadmoe_corrupted = _register("metadmoe-corrupted-fmnist", CorruptedConfig, "corruptions")
metadmoe_mixed = _register("metadmoe-mixed-fmnist", MixedConfig, "mixed-kind domains")
