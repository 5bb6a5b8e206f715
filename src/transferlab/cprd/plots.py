"""Report extras: teacher vs student score distributions (the paper's finding 1) and a notes block."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.registry import Figures
from ..core.stats import fmt_ci, mean_ci, minimal_detectable_effect, paired_values, verdict

if TYPE_CHECKING:  # the experiment modules import this one
    from .experiments import ScenesConfig
    from .experiments_wordnet import WordnetConfig


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def plot_score_distributions(rows: list[dict], cfg: ScenesConfig | WordnetConfig, out_dir) -> Figures:
    """Histogram of teacher vs student scores on test pairs, and notes on teacher quality and spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    sample_rows = [r for r in rows if isinstance(r["metrics"].get("scores_sample"), dict)]
    ref = [r for r in sample_rows if r["arm"] == "infonce"] or sample_rows
    if ref:
        r = sorted(ref, key=lambda r: r["seed"])[0]
        s = r["metrics"]["scores_sample"]
        pos = s["positive"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, key, title in ((axes[0], s.get("teacher_label", "teacher_prob"), "teacher (cross-encoder)"),
                               (axes[1], "student_cos", f"student (dual encoder, arm {r['arm']})")):
            vals = s[key] if key in s else s["teacher_prob"]
            ax.hist([v for v, p in zip(vals, pos) if p], bins=30, alpha=0.6, label="positive pairs")
            ax.hist([v for v, p in zip(vals, pos) if not p], bins=30, alpha=0.6, label="hard negatives")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("sigmoid(ITM logit)" if ax is axes[0] else "cosine similarity")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Score distributions on test pairs (seed {r['seed']})", fontsize=10)
        fig.tight_layout()
        path = out_dir / "score_distributions.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    # notes: teacher quality and score spread, averaged over seeds (they do not depend on the arm for the teacher)
    m = [r["metrics"] for r in rows]
    lines = ["### Teacher and score-distribution notes", ""]
    if m and "teacher_family_acc" in m[0]:
        lines.append(f"- Teacher (cross-encoder) picks the right scene among its family for "
                     f"{_mean([x.get('teacher_family_acc') for x in m]):.1f}% of test captions (mean over runs).")
    ref_rows = [r["metrics"] for r in rows if r["arm"] == "infonce"]
    if ref_rows and "teacher_val_family_acc" in ref_rows[0] and "val_family_acc" in ref_rows[0]:
        # the teacher's advantage on the validation scenes, against the InfoNCE student of the same seed
        adv = mean_ci([x["teacher_val_family_acc"] - x["val_family_acc"] for x in ref_rows])
        lines.append(f"- Teacher's validation advantage over the InfoNCE student (within-family accuracy, "
                     f"paired over {adv[2]} seeds): {fmt_ci(*adv[:2])} points; teacher "
                     f"{_mean([x['teacher_val_family_acc'] for x in ref_rows]):.1f}%.")
    if ref_rows and "teacher_adv" in ref_rows[0]:
        adv = mean_ci([x["teacher_adv"] for x in ref_rows])
        lines.append(f"- Teacher's validation advantage over zero-shot MiniLM (`teacher_adv`, re-rank R@1, "
                     f"{adv[2]} seeds): {fmt_ci(*adv[:2])} points.")
    if m and "teacher_rerank_R@1" in m[0]:
        lines.append(f"- Teacher re-ranking the student's top-10 glosses gives example->gloss R@1 "
                     f"{_mean([x.get('teacher_rerank_R@1') for x in m]):.1f}% (mean over runs); MiniLM zero-shot "
                     f"RSUM {_mean([x.get('zero_shot_RSUM') for x in m]):.1f}.")
    for arm in sorted({r["arm"] for r in rows}):
        mm = [r["metrics"] for r in rows if r["arm"] == arm]
        if "teacher_prob_std" in mm[0]:
            fam = _mean([x.get("family_acc") for x in mm])
            fam_txt = "" if fam != fam else f"student within-family accuracy {fam:.1f}%, "
            lines.append(
                f"- arm {arm}: {fam_txt}Spearman(student, teacher) on hard negatives "
                f"{_mean([x.get('rank_corr_teacher') for x in mm]):.3f}, teacher-probability IQR "
                f"{_mean([x.get('teacher_prob_iqr') for x in mm]):.3f} vs student-cosine IQR "
                f"{_mean([x.get('student_cos_iqr') for x in mm]):.3f}, "
                f"chosen λ {sorted({x.get('weight') for x in mm})}")
    lines += _cprd_contrasts(rows)
    return Figures(paths, "\n".join(lines) + "\n")


# CPRD against each baseline and control (does the gain come from the teacher's ranking?), and the
# hard/all/easy ablations of finding 2
CONTRASTS = [("cprd", b) for b in ("infonce", "kl", "listnet", "margin_mse", "cprd_self", "cprd_random")] + [
    ("cprd", "cprd_all"), ("cprd_easy", "infonce"), ("cprd", "cprd_easy")]


def _cprd_contrasts(rows: list[dict], metric: str = "RSUM") -> list[str]:
    by = {}
    for r in rows:
        v = r["metrics"].get(metric)
        if isinstance(v, (int, float)):
            by.setdefault(r["arm"], {})[r["seed"]] = float(v)
    out = []
    for a, b in CONTRASTS:
        if a in by and b in by:
            d = paired_values(by[a], by[b])
            mean, half, n = mean_ci(d)
            out.append(f"- {metric} {a} − {b}: {fmt_ci(mean, half)} over {n} paired seeds: "
                       f"{verdict(mean, half, minimal_detectable_effect(d))}")
    return ["", f"Paired {metric} contrasts (mean ± 95% CI; MDE at 80% power):", "", *out] if out else []
