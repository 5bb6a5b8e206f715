"""Report hook of `kind-fmnist`: a grid of generated samples per arm, and notes with plain caveats."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.registry import Figures
from ..core.stats import fmt_ci, mean_ci, minimal_detectable_effect, paired_values, verdict

if TYPE_CHECKING:
    from .experiments import KindFmnistConfig

FMNIST = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
# The notes call samples "not yet meaningful" below 50% class-conditional accuracy (chance is 25% for
# 4 classes), and "close to real images" only within 5x the real-vs-real FMNIST-FID floor: two separate
# claims (samples can be recognisable as their class and still far from real images).
MIN_CLASS_ACC, MAX_FID_OVER_FLOOR = 50.0, 5.0


def _mean(rows, arm, key):
    vals = [r["metrics"][key] for r in rows if r["arm"] == arm and isinstance(r["metrics"].get(key), (int, float))]
    return sum(vals) / len(vals) if vals else float("nan")


def _ci(vals: list[float], digits: int = 2) -> str:
    mean, half, _ = mean_ci(vals)
    return fmt_ci(mean, half, digits)


def guidance_table(rows: list[dict], arms: list[str], suffix: str, ref: str = "kind") -> list[str]:
    """Markdown table of FMNIST-FID and class accuracy at one further guidance scale (metric names
    ending in `suffix`), mean ± 95% CI over seeds, and the paired difference to `ref` on shared seeds."""
    keys = [f"fmnist_fid{suffix}", f"class_acc{suffix}"]
    by = {(r["arm"], r["seed"]): r["metrics"] for r in rows}
    lines = ["| arm | n | " + " | ".join(keys) + " | " + " | ".join(f"Δ{k} vs {ref}" for k in keys) + " |",
             "|---" * (2 + 2 * len(keys)) + "|"]
    for a in arms:
        seeds = sorted(s for (arm, s) in by if arm == a and all(k in by[arm, s] for k in keys))
        cells = [_ci([by[a, s][k] for s in seeds]) for k in keys]
        paired = [s for s in seeds if (ref, s) in by and all(k in by[ref, s] for k in keys)]
        deltas = ["–" if a == ref else _ci([by[a, s][k] - by[ref, s][k] for s in paired]) for k in keys]
        lines.append(f"| {a} | {len(seeds)} | " + " | ".join(cells + deltas) + " |")
    return lines


# The verdict's questions, as paired contrasts (a − b): KIND against each baseline at today's share and
# at the paper-like share; then what the gain is made of: the gate (kind vs kind_nogate, same factorised
# pre-training), KIND's pre-training (kind vs kind_svd, same transfer from dense weights), the gate on a
# dense model's transfer (gated_lora vs lora) and KIND's transfer vs gated LoRA from one dense model.
CONTRASTS = (
    [("kind", b) for b in ("full_finetune", "lora", "svdiff", "gated_lora", "scratch")]
    + [("kind_paper", b) for b in ("full_finetune", "lora_paper", "svdiff", "gated_lora_paper")]
    + [("kind", "kind_nogate"), ("kind_paper", "kind_nogate_paper"), ("kind", "kind_svd"),
       ("kind_paper", "kind_svd_paper"), ("kind_nogate", "kind_svd"), ("kind_svd", "gated_lora"),
       ("gated_lora", "lora")])
# (metric, digits, higher is better); *_g2 are the guidance-2 samples, heldout_mse is guidance-free
CONTRAST_METRICS = (("fmnist_fid", 1, False), ("class_acc", 1, True), ("heldout_mse", 4, False),
                    ("fmnist_fid_g2", 1, False), ("class_acc_g2", 1, True))


def contrast_table(rows: list[dict]) -> list[str]:
    """Markdown table of the paired contrasts above that the rows hold: per metric the mean ± 95% CI of
    a − b over shared seeds and "better"/"worse" for a where the CI excludes 0, else the MDE (80% power)."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        for key, _, _ in CONTRAST_METRICS:
            v = r["metrics"].get(key)
            if isinstance(v, (int, float)):
                by.setdefault((r["arm"], key), {})[r["seed"]] = float(v)
    keys = [m for m in CONTRAST_METRICS if any(k == m[0] for _, k in by)]
    out = []
    for a, b in CONTRASTS:
        cells = []
        for key, digits, higher in keys:
            d = paired_values(by.get((a, key), {}), by.get((b, key), {}))
            mean, half, n = mean_ci(d)
            word = verdict(mean, half, minimal_detectable_effect(d), higher)
            word = word.replace("no difference detected", "n.d.")
            cells.append("–" if n == 0 else f"{fmt_ci(mean, half, digits)} {word}")
        if any(c != "–" for c in cells):
            out.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "**Paired contrasts** (a − b over shared seeds, mean ± 95% CI; \"better\"/\"worse\" says how a "
                "fares where the CI excludes 0, n.d. = no difference detected, with the minimal detectable effect "
                "at 80% power; lower FMNIST-FID and heldout_mse are better; `_g2` = sampled at guidance 2):", "",
            "| a − b | " + " | ".join(k for k, _, _ in keys) + " |", "|---" * (1 + len(keys)) + "|", *out]


GRID_PER_CLASS = 8  # generated images per class in the report's sample grid


def encode_grid(grid: torch.Tensor) -> str:
    """A [classes, n, 28, 28] uint8 sample grid as text for the results line: "<classes>x<n>:<base64>"."""
    if grid.dtype != torch.uint8 or grid.dim() != 4 or tuple(grid.shape[2:]) != (28, 28):
        raise ValueError(f"expected a uint8 grid [classes, n, 28, 28], got {grid.dtype} {tuple(grid.shape)}")
    c, n = grid.shape[:2]
    return f"{c}x{n}:" + base64.b64encode(grid.contiguous().numpy().tobytes()).decode("ascii")


def decode_grid(text: str) -> torch.Tensor:
    """Inverse of `encode_grid`."""
    shape, data = text.split(":", 1)
    c, n = (int(v) for v in shape.split("x"))
    return torch.frombuffer(bytearray(base64.b64decode(data)), dtype=torch.uint8).view(c, n, 28, 28)


def plot_kind(rows: list[dict], cfg: KindFmnistConfig, out_dir) -> Figures:
    """The sample grid of every arm (from its results line) and the notes: what the numbers can claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    arms = [a for a in cfg.arms if any(r["arm"] == a for r in rows)]
    grids = {}
    for a in arms:
        with_grid = sorted((r for r in rows if r["arm"] == a and "sample_grid" in r["metrics"]),
                           key=lambda r: r["seed"])
        if with_grid:
            grids[a] = decode_grid(with_grid[0]["metrics"]["sample_grid"])
    paths = []
    if grids:
        cols = min(len(grids), 7)
        nrows = -(-len(grids) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.1 * nrows), squeeze=False)
        for ax in axes.flat[len(grids):]:
            ax.axis("off")
        for ax, (a, g) in zip(axes.flat, grids.items()):
            c, n = g.shape[:2]
            img = g.permute(0, 2, 1, 3).reshape(c * 28, n * 28)
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_title(a, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([14 + 28 * i for i in range(c)])
            ax.set_yticklabels([FMNIST[k] for k in cfg.target_classes], fontsize=7)
        fig.tight_layout()
        path = out_dir / "samples.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    lines = ["", "**Samples and caveats.**", "",
             f"![generated samples at guidance {cfg.cfg_scales[0]:g}, one row per held-out class, seed 0]"
             "(samples.png)", "",
             "FMNIST-FID is a Fréchet distance in the features of a Fashion-MNIST classifier trained in this "
             "experiment (its test accuracy on the held-out classes is `judge_acc`); it is **not** FID and not "
             "comparable with published FID numbers. `fid_floor` is the same distance between two sets of real "
             "images of the same size (the best any generator could reach).", ""]
    for a in arms:
        acc, fid, floor = _mean(rows, a, "class_acc"), _mean(rows, a, "fmnist_fid"), _mean(rows, a, "fid_floor")
        if acc < MIN_CLASS_ACC:
            verdict = "samples NOT yet meaningful"
        elif fid <= MAX_FID_OVER_FLOOR * floor:
            verdict = "recognisable samples, close to real images"
        else:
            verdict = f"recognisable as their class, but far from real images (over {MAX_FID_OVER_FLOOR:g}x the floor)"
        lines.append(f"- `{a}`: class-conditional accuracy {acc:.1f}% (chance 25%), FMNIST-FID {fid:.1f} vs "
                     f"floor {floor:.1f} -> {verdict}.")
    for g in cfg.cfg_scales[1:]:
        suffix = f"_g{g:g}"
        if any(f"fmnist_fid{suffix}" in r["metrics"] for r in rows):
            lines += ["", f"**Guidance {g:g}** (the headline table samples at guidance {cfg.cfg_scales[0]:g}; "
                          "mean ± 95% CI over seeds, differences paired by seed):", ""]
            lines += guidance_table(rows, arms, suffix)
    lines += contrast_table(rows)
    profile = rows[0].get("profile") if rows else None
    if profile != "full":
        lines += ["", f"This is the **{profile}** profile (a width-{cfg.width}, depth-{cfg.depth} DiT, "
                      f"{cfg.pretrain_steps} pre-training and {cfg.transfer_steps} transfer steps). Where the "
                      "samples are not meaningful, their FMNIST-FID and class accuracy do not rank the arms; "
                      "`heldout_mse`, the guidance-free denoising loss on real held-out images, still does. The "
                      "full (GPU) profile is the larger test."]
    return Figures(paths, "\n".join(lines) + "\n")
