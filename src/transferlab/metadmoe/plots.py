"""Plots (per-domain accuracy, expert x domain heatmap, meta-training curve) and the notes under the table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.registry import Figures
from ..core.stats import fmt_ci, mean_ci, minimal_detectable_effect
from .domains import FAMILIES, VAL_DOMAINS

if TYPE_CHECKING:
    from .experiments import MetaDMoEExperimentConfig

META_ARMS = ("metadmoe", "no_mask", "first_order", "avg_experts")


def _paired(by, a, b, key, seeds):
    return [by[(a, s)][key] - by[(b, s)][key] for s in seeds
            if (a, s) in by and (b, s) in by and key in by[(a, s)] and key in by[(b, s)]]


def _ci(d) -> str:
    return fmt_ci(*mean_ci(d)[:2]) + f" (n={len(d)})" if d else "–"


def _controls(rows: list[dict], folds) -> str:
    """What the main table cannot show: the step's own effect, the step's pull towards the teacher, wins."""
    by = {(r["arm"], r["seed"]): r["metrics"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["", "| arm | acc − acc_noadapt (the step itself) | feature MSE to teacher before → after the step | "
             "(fold, seed) pairs beating ERM |", "|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == "erm":
            continue
        eff = _ci([by[(arm, s)]["acc_avg"] - by[(arm, s)]["acc_noadapt_avg"] for s in seeds
                   if "acc_noadapt_avg" in by.get((arm, s), {}) and "acc_avg" in by[(arm, s)]])
        mse = "–"
        pairs = [(m["mse_before_avg"], m["mse_after_avg"]) for (a, _), m in by.items()
                 if a == arm and "mse_after_avg" in m]
        if pairs:
            mse = f"{sum(p[0] for p in pairs) / len(pairs):.4g} → {sum(p[1] for p in pairs) / len(pairs):.4g}"
        wins = total = 0
        for s in seeds:
            for f in folds:
                a, b = by.get((arm, s), {}).get(f"acc_d{f}"), by.get(("erm", s), {}).get(f"acc_d{f}")
                if a is not None and b is not None:
                    total, wins = total + 1, wins + (a > b)
        lines.append(f"| {arm} | {eff} | {mse} | {wins}/{total} |")
    erm = [by[("erm", s)] for s in seeds if ("erm", s) in by]
    if erm and "ensemble_acc_avg" in erm[0]:
        lines += ["", "Go/no-go (erm rows; held-out domain, mean over seeds): "
                  + ", ".join(f"{k} {sum(m[k] for m in erm) / len(erm):.2f}"
                              for k in ("acc_avg", "ensemble_acc_avg", "teacher_acc_avg", "teacher_shead_acc_avg")
                              if all(k in m for m in erm))
                  + "; ERM-student feature MSE to the teacher "
                  + f"{sum(m['mse_teacher_avg'] for m in erm) / len(erm):.4g}."]
    # the teacher's diagnostics are recorded on the erm rows (the ERM student's held-out domain)
    diag = {"ensemble": "ensemble_acc_avg", "teacher (student's head)": "teacher_shead_acc_avg"}
    for a, b in (("ensemble", "erm"), ("teacher (student's head)", "erm"), ("metadmoe", "erm"),
                 ("metadmoe", "erm_extra"), ("metadmoe", "tent"), ("metadmoe", "adapt_no_meta"),
                 ("metadmoe", "avg_experts")):
        d = ([by[("erm", s)][diag[a]] - by[("erm", s)]["acc_avg"] for s in seeds
              if diag[a] in by.get(("erm", s), {})] if a in diag else _paired(by, a, b, "acc_avg", seeds))
        if d:
            lines.append(f"- {a} − {b}: {_ci(d)}" + (f", MDE {minimal_detectable_effect(d):.2f}" if len(d) > 1 else ""))
    gap = _specialisation(rows, folds)
    if gap:
        lines.append(f"- experts' specialisation (an expert on its own domain minus the other experts there, "
                     f"source validation shards): {_ci(gap)}")
    return "\n".join(lines) + "\n"


def _expert_matrices(row: dict, folds):
    """(expert x domain accuracy, each expert's own domain) of every fold the row recorded."""
    for f in folds:
        mat, doms = row["metrics"].get(f"expert_matrix_d{f}"), row["metrics"].get(f"expert_domains_d{f}")
        if mat:
            yield mat, doms


def _specialisation(rows: list[dict], folds) -> list[float]:
    """Per seed: how much better each expert is on its own domain than the other experts are there."""
    out = []
    for r in rows:
        if r["arm"] != "erm":
            continue
        gaps = []
        for mat, doms in _expert_matrices(r, folds):
            if len(mat) < 2:
                continue
            for k, d in enumerate(doms):
                others = [mat[j][d] for j in range(len(doms)) if j != k]
                gaps.append(mat[k][d] - sum(others) / len(others))
        if gaps:
            out.append(sum(gaps) / len(gaps))
    return out


def _notes(cfg: MetaDMoEExperimentConfig, seeds_done: int) -> str:
    names, mc = FAMILIES[cfg.family], cfg.method
    held = ", ".join(f"d{d} = {names[d]}" for d in cfg.held_out)
    sel = (f"the validation domains {list(VAL_DOMAINS[cfg.family])} (never sources, never test folds)"
           if cfg.selection == "val_domains" else "source validation shards, own expert masked")
    lines = [
        "### Protocol and caveats (Meta-DMoE)",
        f"- Held-out domains in this run: {held}"
        + ("" if len(cfg.held_out) == 6 else " — **a subset of the six folds**; acc_avg averages only these."),
        f"- {cfg.n_train} training + {cfg.n_val} validation images per domain, {cfg.n_valdom} per validation "
        f"domain, {cfg.n_test} test images of the held-out domain; {seeds_done} of {cfg.seeds} seed(s) finished.",
        f"- Student and experts: at most {mc.student_epochs} / {mc.expert_epochs} epochs, early stopping "
        f"with patience {mc.patience} on source / own-domain validation (0 = fixed epochs). Meta-training "
        f"{mc.meta_epochs} x {mc.episodes_per_epoch} episodes, support {mc.support_size} + query "
        f"{mc.query_size}, one source domain per episode, student/aggregator in {mc.train_mode} mode.",
        f"- Test protocol: Meta-DMoE `{cfg.protocol}` (per_domain = adapt once on the first unlabeled batch of "
        f"{mc.support_size} images, predict the whole domain; official), experts' BN `{mc.expert_bn}`; "
        f"TENT `{cfg.tent_mode}`; BN-adapt normalises each batch with its own statistics.",
        f"- Learning rates (inner lr from {list(cfg.inner_lrs)}, TENT lr from {list(cfg.tent_lrs)}) chosen on "
        f"{sel}; chosen values are lr_d<k> in results.jsonl.",
        "- erm_extra = the ERM student plus as many labeled Adam steps (query batches, outer lr) as meta-training "
        "has episodes; arm_bn = the same steps with BN in train mode on single-domain batches, tested "
        "with BN-adapt (ARM-BN style). oracle = a bound, not a method: one step of the ERM student towards an "
        "expert trained on the held-out domain itself, inner lr chosen on the target.",
        "- Diagnostics per fold in results.jsonl: expert_matrix_d<k> (expert x domain accuracy), ensemble_acc "
        "(experts' mean logits), teacher_acc (aggregator feature + aggregator head), teacher_shead_acc (through "
        "the student's head), mse_before/after (student-teacher feature MSE around the step), curve_d<k>.",
        "- [reconstructed] experts start from the ERM student (`expert_init=student`); small CNNs (D = "
        f"{cfg.hidden}) instead of ResNet-50/DenseNet-121. A mechanism check at CPU scale, not the paper's WILDS.",
    ]
    return "\n".join(lines) + "\n"


def _heatmap(rows, cfg, plt, path):
    """Mean expert accuracy by (domain the expert was trained on, domain evaluated), over folds and seeds."""
    import numpy as np

    tot, cnt = np.zeros((6, 6)), np.zeros((6, 6))
    for r in rows:
        for mat, doms in _expert_matrices(r, cfg.held_out):
            for k, d in enumerate(doms):
                tot[d] += mat[k]
                cnt[d] += 1
    if not cnt.any():
        return None
    mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    names = [str(n) for n in FAMILIES[cfg.family]]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(mean, cmap="viridis")
    for i in range(6):
        for j in range(6):
            if not np.isnan(mean[i, j]):
                ax.text(j, i, f"{mean[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(6), names, rotation=30)
    ax.set_yticks(range(6), names)
    ax.set_xlabel("evaluated on (held-out: test shard)")
    ax.set_ylabel("expert trained on")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(rows, cfg, plt, path):
    """Meta-training query loss before/after the step, mean over folds and seeds (metadmoe arm)."""
    curves = [r["metrics"][f"curve_d{f}"] for r in rows if r["arm"] == "metadmoe"
              for f in cfg.held_out if r["metrics"].get(f"curve_d{f}")]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    ep = [curves[0][i][0] for i in range(n)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, label in ((1, "query loss before the step"), (2, "after the step")):
        ax.plot(ep, [sum(c[i][j] for c in curves) / len(curves) for i in range(n)], label=label)
    ax.set_xlabel("meta-training episode")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(rows: list[dict], cfg: MetaDMoEExperimentConfig, out_dir) -> Figures:
    """Per-domain accuracy, the expert x domain heatmap and the meta-training curve, with the notes."""
    out_dir = Path(out_dir)
    seeds_done = len({r["seed"] for r in rows})
    notes = _notes(cfg, seeds_done) + _controls(rows, list(cfg.held_out))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = list(cfg.held_out)
    arms = [a for a in cfg.arms if any(r["arm"] == a for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        means = []
        for d in folds:
            vals = [r["metrics"][f"acc_d{d}"] for r in rows if r["arm"] == arm and f"acc_d{d}" in r["metrics"]]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(range(len(folds)), means, marker="o", label=arm)
    names = FAMILIES[cfg.family]
    ax.set_xticks(range(len(folds)), [str(names[d]) for d in folds])
    ax.set_xlabel("held-out domain")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out_dir / "per_domain.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    for fn, name in ((_heatmap, "expert_matrix.png"), (_curve, "meta_curve.png")):
        p = fn(rows, cfg, plt, out_dir / name)
        if p is not None:
            paths.append(p)
    return Figures(paths, notes)
