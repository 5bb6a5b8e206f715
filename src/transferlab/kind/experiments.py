"""`kind-fmnist` / `kind-fmnist-all`: pre-train a class-conditional DiT on 6 Fashion-MNIST classes,
transfer it to the 4 held-out classes, and compare KIND with dense transfer baselines.

Arms (same seeds, same transfer steps, paired by seed):
    kind           KIND pre-trained with the class gate; frozen learngenes + new random tailors (reference)
    kind_nogate    KIND pre-trained with every tailor on for every label (the null label too), then the
                   same transfer with the n_learngene components of largest |s| as learngenes (ablation:
                   isolates knowledge *diversion* from the factorisation itself)
    kind_svd       dense pre-trained model split by SVD (top singular triplets = learngenes), then KIND's
                   transfer (`init="svd"`: the path of a user with public dense DiT weights)
    full_finetune  dense DiT pre-trained on the same data, every parameter trained
    lora           dense pre-trained + LoRA on q/k/v/o/fc1/fc2 with about KIND's trainable parameters
    gated_lora     dense pre-trained + LoRA of the same rank whose components are class-gated like KIND's
                   tailors (KIND's transfer structure without KIND's pre-training)
    svdiff         dense pre-trained + SVDiff-like spectral shift (one number per singular value)
    scratch        dense DiT trained on the target classes only

`kind-fmnist` is the few-shot regime (100 images per class); `kind-fmnist-all` uses every training
image of the target classes. The judge network, metrics and sampling live in `evaluate.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.config import field
from ..core.engine import rng_state, set_rng_state
from ..core.errors import UserError
from ..core.registry import register_experiment
from ..data import load_fashion_mnist
from ..nn.diffusion import Diffusion
from ..nn.dit import DiT
from . import evaluate as ev
from .baselines import apply_gated_lora, apply_lora, apply_svdiff, lora_params_per_rank
from .config import KindConfig
from .model import TRAINABLE_GROUPS, convert, fit, kind_stats, transfer
from .plots import GRID_PER_CLASS, encode_grid, plot_kind

KIND_ARMS = ("kind", "kind_nogate", "kind_svd")
# arms whose trainable share follows n_tailor; each also runs at the paper-like share as <arm>_paper
SHARE_ARMS = (*KIND_ARMS, "lora", "gated_lora")
ARMS = ("kind", "kind_nogate", "kind_svd", "full_finetune", "lora", "gated_lora", "svdiff", "scratch",
        *(f"{a}_paper" for a in SHARE_ARMS))


@dataclass(frozen=True)
class KindFmnistConfig:
    """KIND (arXiv 2408.07337) transfer-to-novel-classes protocol (abstract; setup quoted by the acmrep page),
    at Fashion-MNIST scale.

    The paper pre-trains DiT-B/2 and DiT-L/2 on 150 ImageNet superclasses and transfers to 461 novel
    ones; here 6 -> 4 Fashion-MNIST classes. Sizes, steps and the learngene/tailor split are ours.
    """

    arms: tuple[str, ...] = field(ARMS, "arms: " + ", ".join(ARMS))
    seeds: int = field(3, "number of seeds")
    source_classes: tuple[int, ...] = field((0, 1, 2, 3, 4, 5), "Fashion-MNIST classes for pre-training")
    target_classes: tuple[int, ...] = field((6, 7, 8, 9), "held-out classes of the transfer task")
    source_per_class: int = field(6000, "pre-training images per source class (max 6000)")
    target_per_class: int = field(100, "transfer training images per target class (100 = few-shot)")
    val_per_class: int = field(100, "real validation images per target class (train split, disjoint from the "
                                    "transfer images) for choosing the learning rate")
    test_per_class: int = field(1000, "real test images per target class (the metrics' reference set)")
    patch: int = field(4, "DiT patch size (28 must be divisible by it)")
    width: int = field(128, "DiT width")
    depth: int = field(6, "DiT blocks")
    heads: int = field(4, "attention heads")
    timesteps: int = field(1000, "diffusion steps T")
    schedule: str = field("linear", "beta schedule: linear (DiT) or cosine")
    batch_size: int = field(128, "training batch size")
    pretrain_steps: int = field(6000, "pre-training steps (each of: dense, KIND, KIND without gate)")
    pretrain_lr: float = field(3e-4, "AdamW learning rate for pre-training")
    transfer_steps: int = field(1500, "training steps on the target classes (every arm)")
    lrs: tuple[float, ...] = field((1e-4, 3e-4, 1e-3), "transfer learning rates tried per arm; the best by "
                                                        "FMNIST-FID on the validation images is kept")
    tailor_init_scales: tuple[float, ...] = field((1.0,), "s of new tailors as multiples of the Xavier-matched "
                                                          "value, tried (with every lr) by the KIND arms and "
                                                          "chosen on validation; 0 = start at the learngene-only "
                                                          "model [reconstructed]")
    svdiff_lr_mult: float = field(10.0, "LR multiplier for SVDiff's singular-value shifts (SVDiff needs a "
                                        "larger LR)")
    sigma_lr_mult: float = field(1.0, "LR multiplier for KIND's singular values s [reconstructed]")
    class_dropout: float = field(0.1, "label dropout for classifier-free guidance (DiT: 0.1)")
    cfg_scales: tuple[float, ...] = field((1.0, 2.0), "classifier-free guidance scales at sampling; the first "
                                                      "(1 = off) gives the headline metrics and picks the lr, "
                                                      "each further scale g adds metrics named <metric>_g<g>")
    ddim_steps: int = field(50, "DDIM sampling steps")
    samples_per_class: int = field(250, "generated images per target class for the metrics")
    method: KindConfig = field(
        KindConfig(n_learngene=64, n_tailor=64),
        "the KIND decomposition (KindConfig; `--set method.x=...` or `--set x=...`): learngene/tailor "
        "components per matrix [reconstructed: width/2 each here], tailors per class, gate rule, targets, "
        "compute path. The arms set `gate` (off only for kind_nogate's pre-training) and kind_svd sets init='svd'")
    paper_n_learngene: int = field(112, "learngenes per matrix of the *_paper arms [reconstructed]")
    paper_n_tailor: int = field(16, "tailors per matrix of the *_paper arms: about 10% of the rank, the paper's "
                                   "share (45.4M trainable on DiT-L/2 ~ 100 of 1024 per matrix) [reconstructed]")
    transfer_train: tuple[str, ...] = field(("label_embed", "final_layer"), "dense parts trained in transfer "
                                            "by kind, kind_nogate, lora and svdiff [reconstructed]")
    lora_rank: int = field(0, "LoRA and gated-LoRA rank; 0 matches KIND's trainable tailor parameters")
    judge_per_class: int = field(6000, "real training images per class for the judge network (all 10 classes)")
    judge_epochs: int = field(3, "judge training epochs")
    knn_k: int = field(3, "k of the k-NN precision/recall")
    checkpoint_every: int = field(500, "steps between checkpoints (0 = only between phases)")
    data_path: str | None = field(None, "folder with the Fashion-MNIST IDX files (default: Debian package)")

    def check(self) -> None:
        """Cross-field checks, run when the experiment starts (--set applies overrides one at a time)."""
        if set(self.source_classes) & set(self.target_classes):
            raise UserError("source_classes and target_classes must not overlap")
        if 28 % self.patch:
            raise UserError(f"patch={self.patch}: 28 must be divisible by the patch size (1, 2, 4, 7, 14)")
        for g, t in ((self.method.n_learngene, self.method.n_tailor), (self.paper_n_learngene, self.paper_n_tailor)):
            if g + t > self.width:
                raise UserError(f"n_learngene + n_tailor = {g} + {t} exceeds width {self.width}; lower them "
                                "(or paper_n_learngene / paper_n_tailor)")
        if not self.lrs:
            raise UserError("lrs must list at least one learning rate")
        if not self.tailor_init_scales or min(self.tailor_init_scales) < 0:
            raise UserError("tailor_init_scales must list at least one scale, all >= 0")
        if not self.cfg_scales or min(self.cfg_scales) < 0 or len(set(self.cfg_scales)) < len(self.cfg_scales):
            raise UserError(f"cfg_scales={self.cfg_scales}: list distinct guidance scales >= 0, the headline first")
        bad_arms = [a for a in self.arms if a not in ARMS]
        if bad_arms:
            raise UserError(f"unknown arm(s) {bad_arms}; choose from {', '.join(ARMS)}")
        if self.samples_per_class <= self.knn_k:
            raise UserError("samples_per_class must exceed knn_k")
        bad = [t for t in self.transfer_train if t not in TRAINABLE_GROUPS]
        if bad:
            raise UserError(f"transfer_train has unknown group(s) {bad}; choose from {', '.join(TRAINABLE_GROUPS)}")


def _take(y: torch.Tensor, classes, n: int, seed: int, skip: int = 0) -> torch.Tensor:
    out = []
    for c in classes:
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 31 + c))]
        if len(idx) < skip + n:
            raise UserError(f"Fashion-MNIST class {c} has {len(idx)} images here, fewer than the {skip + n} "
                            "asked for; lower target_per_class / val_per_class / test_per_class")
        out.append(idx[skip: skip + n])
    return torch.cat(out)


def _model_space(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1).unsqueeze(1)


def _relabel(y: torch.Tensor, classes) -> torch.Tensor:
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return lut[y]


def _dit(cfg: KindFmnistConfig, num_classes: int) -> DiT:
    return DiT(image_size=28, patch=cfg.patch, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
               num_classes=num_classes)


def _kind_cfg(cfg: KindFmnistConfig, gate: bool) -> KindConfig:
    """The experiment's KindConfig with the arm's gate."""
    return dataclasses.replace(cfg.method, gate=gate)


# the fields that decide a pre-trained model (with the KindConfig of the KIND families): `kind-fmnist`
# and `kind-fmnist-all` differ only in the transfer data, so runs that agree here share pre-training
PRETRAIN_FIELDS = ("source_classes", "source_per_class", "patch", "width", "depth", "heads", "timesteps",
                   "schedule", "batch_size", "pretrain_steps", "pretrain_lr", "sigma_lr_mult", "class_dropout",
                   "data_path")
# the fields that only KIND's pre-training reads: both shares reuse one dense model
KIND_FIELDS = ("sigma_lr_mult",)
# bumped when pre-training itself changes (2: without a gate the null label uses every tailor too)
PRETRAIN_FORMAT = 2
FAMILY_SEED = {"dense": 0, "kind": 1, "kind_nogate": 2}


def pretrain_key(cfg, family: str) -> dict:
    """What the pre-trained model of `family` depends on (the key of its shared artifact)."""
    key = {f: getattr(cfg, f) for f in PRETRAIN_FIELDS if family != "dense" or f not in KIND_FIELDS}
    if family != "dense":
        key["method"] = dataclasses.asdict(_kind_cfg(cfg, gate=(family == "kind")))
    return {"kind-pretrained": PRETRAIN_FORMAT, "family": family, **key}


def _pretrained(cfg, family: str, seed: int, ctx, diffusion, data) -> torch.nn.Module:
    """The pre-trained model of a family (dense / kind / kind_nogate), built once per seed for all arms.

    With `run --jobs N` the arms that share it wait for one pre-training; the ranks of one distributed
    run pre-train it together (data-parallel, checkpointed).
    """
    torch.manual_seed(seed * 7 + FAMILY_SEED[family])
    model = _dit(cfg, len(cfg.source_classes))
    if family != "dense":
        convert(model, _kind_cfg(cfg, gate=(family == "kind")))
    model = model.to(ctx.device)

    def pretrain() -> dict:
        xs, ys = data["source"]
        fit(model, xs.to(ctx.device), ys.to(ctx.device), diffusion=diffusion, steps=cfg.pretrain_steps,
            batch_size=cfg.batch_size, lr=cfg.pretrain_lr, sigma_lr_mult=cfg.sigma_lr_mult,
            class_dropout=cfg.class_dropout, seed=seed, engine=ctx, phase=f"pretrain-{family}",
            checkpoint_every=cfg.checkpoint_every)
        return model.state_dict()

    # the arm's random stream continues from here whether this process trains the model or loads it
    # (transfer draws timesteps, noise and label dropout from it), so results do not depend on which
    # arm or worker happened to build the shared model
    rng = rng_state()
    # one scope for kind-fmnist and kind-fmnist-all: both transfer from the same pre-trained models
    state = ctx.shared(f"pretrained-{family}", pretrain, key=pretrain_key(cfg, family), collective=True,
                       scope="kind-pretrained")
    set_rng_state(rng)
    model.load_state_dict(state)  # (after training: the model's own weights, a no-op copy)
    return model


def _freeze_except(model, groups) -> None:
    frags = [f for g in groups for f in TRAINABLE_GROUPS[g]]
    for n, p in model.named_parameters():
        p.requires_grad_(any(f in n for f in frags))


def _kind_tailor_params(cfg) -> int:
    """KIND's trainable tailor parameters for this DiT size (for matching LoRA's rank)."""
    probe = convert(_dit(cfg, len(cfg.target_classes)), _kind_cfg(cfg, gate=True))
    return kind_stats(probe)["tailor"]


def lora_rank(cfg, model) -> int:
    """LoRA rank of the lora and gated_lora arms: `cfg.lora_rank`, or matched to KIND's tailor parameters."""
    return cfg.lora_rank or max(1, round(_kind_tailor_params(cfg) / lora_params_per_rank(model)))


def arm_config(cfg, arm: str):
    """(base arm, config): an arm ending in _paper is its base arm at the paper-like share."""
    if arm.endswith("_paper") and arm[:-6] in SHARE_ARMS:
        method = dataclasses.replace(cfg.method, n_learngene=cfg.paper_n_learngene, n_tailor=cfg.paper_n_tailor)
        return arm[:-6], dataclasses.replace(cfg, method=method)
    if arm not in ARMS:
        raise UserError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return arm, cfg


def build_arm(cfg, arm: str, seed: int, ctx, diffusion, data, tailor_init_scale: float = 1.0
              ) -> tuple[torch.nn.Module, float]:
    """The model ready for transfer training, and its LR multiplier for the singular-value group."""
    arm, cfg = arm_config(cfg, arm)
    n_new = len(cfg.target_classes)
    if arm == "scratch":
        torch.manual_seed(seed * 7 + 3)
        return _dit(cfg, n_new).to(ctx.device), 1.0
    g = torch.Generator().manual_seed(seed * 7 + 5)
    if arm in ("kind", "kind_nogate"):
        model = _pretrained(cfg, arm, seed, ctx, diffusion, data)
        # the gate is on in transfer for both: the ablation differs only in how pre-training routed, and
        # (its split being arbitrary) keeps the components of largest |s| as learngenes
        transfer(model, n_new, train=cfg.transfer_train, tailor_init_scale=tailor_init_scale, gate=True,
                 learngenes="first" if arm == "kind" else "top_sigma", generator=g)
        return model, cfg.sigma_lr_mult
    model = _pretrained(cfg, "dense", seed, ctx, diffusion, data)
    if arm == "kind_svd":
        convert(model, dataclasses.replace(_kind_cfg(cfg, gate=True), init="svd"))
        transfer(model, n_new, train=cfg.transfer_train, tailor_init_scale=tailor_init_scale, gate=True,
                 generator=g)
        return model, cfg.sigma_lr_mult
    torch.manual_seed(seed * 7 + 6)
    model.reset_classes(n_new)
    if arm == "full_finetune":
        return model, 1.0
    _freeze_except(model, cfg.transfer_train)
    if arm == "lora":
        apply_lora(model, lora_rank(cfg, model))
        return model, 1.0
    if arm == "gated_lora":
        apply_gated_lora(model, lora_rank(cfg, model), assignment=cfg.method.assignment)
        return model, 1.0
    if arm == "svdiff":
        apply_svdiff(model)
        return model, cfg.svdiff_lr_mult
    raise UserError(f"unknown arm {arm!r}")


def candidates(cfg, arm: str) -> list[tuple[float, float]]:
    """The (lr, tailor_init_scale) pairs an arm tries; only the KIND arms have new tailors to scale."""
    scales = cfg.tailor_init_scales if arm_config(cfg, arm)[0] in KIND_ARMS else (1.0,)
    return [(lr, sc) for sc in scales for lr in cfg.lrs]


def _load_data(cfg, seed: int) -> dict:
    x, y = load_fashion_mnist("train", cfg.data_path)
    xt, yt = load_fashion_mnist("test", cfg.data_path)
    src = _take(y, cfg.source_classes, cfg.source_per_class, seed)
    tgt = _take(y, cfg.target_classes, cfg.target_per_class, seed + 1000)
    val = _take(y, cfg.target_classes, cfg.val_per_class, seed + 1000, skip=cfg.target_per_class)
    test = _take(yt, cfg.target_classes, cfg.test_per_class, 0)
    # real-vs-real floor: as many real training images as generated ones, against the same test set
    floor = _take(y, cfg.target_classes, min(cfg.samples_per_class, 6000 - cfg.target_per_class), seed + 2000)
    judge = _take(y, range(10), cfg.judge_per_class, seed + 3000)
    return {
        "source": (_model_space(x[src]), _relabel(y[src], cfg.source_classes)),
        "target": (_model_space(x[tgt]), _relabel(y[tgt], cfg.target_classes)),
        "val01": x[val].float().div(255).unsqueeze(1),
        "test": (_model_space(xt[test]), _relabel(yt[test], cfg.target_classes)),
        "test01": xt[test].float().div(255).unsqueeze(1),
        "floor01": x[floor].float().div(255).unsqueeze(1),
        "judge": (x[judge].float().div(255).unsqueeze(1), y[judge]),
    }


def _samples(cfg, model, diffusion, per_class: int, seed: int, device, cfg_scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(len(cfg.target_classes)).repeat_interleave(per_class)
    x = ev.generate(model, diffusion, labels, steps=cfg.ddim_steps, cfg_scale=cfg_scale,
                    null_label=len(cfg.target_classes), seed=seed, device=device)
    return x, torch.tensor(cfg.target_classes)[labels]


def _val_score(val_fid: float) -> float:
    """Validation FMNIST-FID as a score to minimise: a diverged run (NaN) loses to any finite one."""
    return float("inf") if val_fid != val_fid else val_fid


def _start_phase(ctx, phase: str) -> None:
    """Make the next `fit(phase=phase)` continue from the current random stream.

    `fit` resumes from the run's checkpoint, which restores the random state saved with it; a
    checkpoint of an earlier phase (pre-training, another candidate) would otherwise replace the
    current stream, and only in the run that wrote it. A checkpoint of `phase` itself is kept (resume).
    """
    rng = rng_state()
    last = ctx.load_checkpoint()
    set_rng_state(rng)
    if last is None or last.get("phase") != phase:
        ctx.save_checkpoint({"phase": f"before-{phase}"})


def _suffix(scale: float, first: bool) -> str:
    return "" if first else f"_g{scale:g}"


JUDGE_FIELDS = ("judge_per_class", "judge_epochs", "data_path")


def _judge(cfg, seed: int, data, ctx):
    """The judge network of a seed, trained once and shared by every arm (and by configs that agree on
    JUDGE_FIELDS)."""
    x, y = data["judge"]
    state = ctx.shared("judge", lambda: ev.train_judge(x, y, epochs=cfg.judge_epochs, seed=seed,
                                                       device=ctx.device).state_dict(),
                       key={"kind-judge": {f: getattr(cfg, f) for f in JUDGE_FIELDS}})
    return ev.judge_from_state(state)


def kind_fmnist(cfg: KindFmnistConfig, arm: str, seed: int, ctx) -> dict:
    cfg.check()
    diffusion = Diffusion(cfg.timesteps, cfg.schedule)
    data = _load_data(cfg, seed)
    judge = _judge(cfg, seed, data, ctx)
    xt, yt = data["target"]
    xt, yt = xt.to(ctx.device), yt.to(ctx.device)
    grid_points = candidates(cfg, arm)

    def train(i: int, lr: float, scale: float):
        """Candidate i: the arm built and transferred with (lr, scale); a resumable stage of this run."""
        model, sig_mult = build_arm(cfg, arm, seed, ctx, diffusion, data, tailor_init_scale=scale)

        def run() -> dict:
            _start_phase(ctx, f"transfer-lr{i}")
            losses = fit(model, xt, yt, diffusion=diffusion, steps=cfg.transfer_steps, batch_size=cfg.batch_size,
                         lr=lr, sigma_lr_mult=sig_mult, class_dropout=cfg.class_dropout, seed=seed + 100 * i,
                         engine=ctx, phase=f"transfer-lr{i}", checkpoint_every=cfg.checkpoint_every)
            val_fid = float("nan")
            if len(grid_points) > 1:  # validation FID only where there is something to choose
                fake, _ = _samples(cfg, model, diffusion, cfg.val_per_class, seed + 50_000, ctx.device,
                                   cfg.cfg_scales[0])
                f_fake, _ = ev.judge_outputs(judge, ev.to_unit(fake))
                f_val, _ = ev.judge_outputs(judge, data["val01"])
                val_fid = ev.frechet_distance(f_val, f_fake)
            return {"model": model.state_dict(), "val_fid": val_fid, "losses": losses}

        blob = ctx.stage(f"lr{i}", run)
        model.load_state_dict(blob["model"])  # (after training: the model's own weights, a no-op copy)
        return model, blob["val_fid"], blob["losses"]

    # chosen on validation images, never on the test set
    if len(grid_points) == 1:
        (lr, scale), (model, val_fid, losses) = grid_points[0], train(0, *grid_points[0])
    else:
        order = iter(range(len(grid_points)))  # fit is called once per candidate, in order
        (lr, scale), (model, val_fid, losses) = ctx.choose_on_validation(
            "lr_tailor_init_scale", grid_points, fit=lambda c: train(next(order), *c),
            score=lambda fitted: _val_score(fitted[1]), higher_is_better=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {}
    for j, g in enumerate(cfg.cfg_scales):
        fake, fake_labels = _samples(cfg, model, diffusion, cfg.samples_per_class, seed + 90_000, ctx.device, g)
        sm = ev.sample_metrics(judge, ev.to_unit(fake), fake_labels, data["test01"], cfg.knn_k)
        metrics.update({k + _suffix(g, j == 0): v for k, v in sm.items()})
        if j == 0 and seed == 0:  # a small grid per class at the headline guidance, for the report's figure
            per_class = fake.view(len(cfg.target_classes), cfg.samples_per_class, 28, 28)[:, :GRID_PER_CLASS]
            grid = ((per_class + 1) * 127.5).round()
            metrics["sample_grid"] = encode_grid(grid.to(torch.uint8))
    f_floor, _ = ev.judge_outputs(judge, data["floor01"])
    f_test, _ = ev.judge_outputs(judge, data["test01"])
    _, judge_pred = ev.judge_outputs(judge, data["test01"])
    xte, yte = data["test"]
    metrics.update({
        "fid_floor": ev.frechet_distance(f_test, f_floor),
        "judge_acc": 100 * (judge_pred == torch.tensor(cfg.target_classes)[yte]).float().mean().item(),
        "heldout_mse": ev.heldout_mse(model, diffusion, xte[:1000], yte[:1000], ctx.device),
        "trainable_params": float(trainable),
        "mflops": 1000 * ev.gflops_per_sample(model, ctx.device, 0),
        "lr": lr, "tailor_init_scale": scale, "val_fid": val_fid,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
    })
    return metrics


# full: the GPU profile (width 128, depth 6; 5 pre-trainings x 4000 steps and 13 arms per seed); its run
# time is not measured
_FULL = {"seeds": 3, "pretrain_steps": 4000, "transfer_steps": 1000, "lrs": (1e-3, 3e-3, 1e-2),
         "tailor_init_scales": (1.0, 0.0)}
_SMALL = {"patch": 7, "width": 64, "depth": 4, "heads": 4, "batch_size": 64, "method.n_learngene": 32,
          "method.n_tailor": 32, "paper_n_learngene": 56, "paper_n_tailor": 8}
# quick: the CPU demo; checks the pipeline end to end, samples are not expected to be meaningful
_QUICK = {**_SMALL, "seeds": 2, "source_per_class": 1000, "pretrain_steps": 150, "transfer_steps": 80,
          "lrs": (1e-3,), "ddim_steps": 20, "samples_per_class": 80, "val_per_class": 50, "test_per_class": 200,
          "judge_per_class": 300, "judge_epochs": 1, "checkpoint_every": 50,
          # every code path once (both shares, gated LoRA, SVD start), not every arm at both shares
          "arms": ("kind", "kind_nogate", "kind_svd", "full_finetune", "lora", "gated_lora", "svdiff", "scratch",
                   "kind_paper", "gated_lora_paper")}
# tiny (the conformance tests, a few seconds per arm): a toy DiT and a handful of steps and images
_TINY = {**_QUICK, "seeds": 1, "pretrain_steps": 3, "transfer_steps": 3, "source_per_class": 40,
         "target_per_class": 10, "val_per_class": 10, "test_per_class": 20, "samples_per_class": 8,
         "judge_per_class": 20, "judge_epochs": 1, "ddim_steps": 2, "width": 16, "depth": 1, "heads": 2, "patch": 7,
         "method.n_learngene": 8, "method.n_tailor": 8, "paper_n_learngene": 12, "paper_n_tailor": 4,
         "batch_size": 16, "checkpoint_every": 2, "lrs": (1e-3, 3e-3)}
# medium: a CPU run of about 15 CPU-minutes per seed; one preset LR (not tuned)
_MEDIUM = {**_SMALL, "seeds": 2, "pretrain_steps": 500, "transfer_steps": 200, "lrs": (1e-3,), "ddim_steps": 20,
           "samples_per_class": 100, "test_per_class": 500, "judge_per_class": 1000, "judge_epochs": 1,
           "checkpoint_every": 100}
# cpu: sized so that kind-fmnist (13 arms) and kind-fmnist-all (the 8 arms at today's share) with 6 seeds
# finish in about 2.6 h on 2 cores with --jobs 2, from a per-step time of 0.075 CPU-s (batch 64, one
# thread) and 3 / 18 CPU-s for the validation / final samples of one run. Pre-training (dense, KIND and
# KIND without gate at both shares: 5 x 3000 steps per seed) is shared by both experiments and every arm.
# The lr grid starts at the top of the former grid {3e-4, 1e-3} (chosen by every arm on every seed)
# and extends one decade past it; KIND's new tailors also try a zero start.
_CPU = {**_SMALL, "seeds": 6, "pretrain_steps": 3000, "pretrain_lr": 1e-3, "transfer_steps": 150,
        "lrs": (1e-3, 3e-3, 1e-2), "tailor_init_scales": (1.0, 0.0), "ddim_steps": 20, "samples_per_class": 200,
        "test_per_class": 1000, "judge_per_class": 2000, "judge_epochs": 2, "checkpoint_every": 500}
_TODAY_SHARE = tuple(a for a in ARMS if not a.endswith("_paper"))

# headline (guidance 1) metrics beside the guidance-free heldout_mse, then the guidance-2 table's columns
METRICS = ("fmnist_fid", "class_acc", "heldout_mse", "precision", "recall", "fid_floor", "fmnist_fid_g2",
           "class_acc_g2", "precision_g2", "recall_g2", "trainable_params", "mflops")

register_experiment(
    "kind-fmnist", config=KindFmnistConfig, reference="kind", method="kind", baseline="full_finetune",
    metrics=METRICS,
    description="KIND: DiT pre-trained on 6 Fashion-MNIST classes, few-shot (100/class) transfer to 4 held-out "
                "classes; KIND vs full fine-tuning, LoRA, SVDiff, scratch, no-gate ablation",
    profiles={"tiny": _TINY, "quick": _QUICK, "medium": _MEDIUM, "cpu": _CPU, "full": _FULL}, plot=plot_kind,
)(kind_fmnist)

register_experiment(
    "kind-fmnist-all", config=KindFmnistConfig, reference="kind", method="kind", baseline="full_finetune",
    metrics=METRICS,
    description="KIND on Fashion-MNIST 6 -> 4 classes with every training image of the target classes",
    # the demo runs this regime with one seed only (the few-shot experiment has two), to fit its time budget
    profiles={"tiny": {**_TINY, "arms": tuple(a for a in _TINY["arms"] if not a.endswith("_paper"))},
              "quick": {**_QUICK, "seeds": 1, "target_per_class": 1000,
                        "arms": tuple(a for a in _QUICK["arms"] if not a.endswith("_paper"))},
              "medium": {**_MEDIUM, "target_per_class": 5800},
              "cpu": {**_CPU, "target_per_class": 5800, "arms": _TODAY_SHARE},
              "full": {**_FULL, "target_per_class": 5800}},
    plot=plot_kind,
)(kind_fmnist)

__all__ = ["KindFmnistConfig", "kind_fmnist", "build_arm"]
