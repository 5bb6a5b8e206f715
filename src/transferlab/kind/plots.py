"""Report hook of `kind-fmnist`: a grid of generated samples per arm, and notes with plain caveats."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.registry import Figures

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


# two-sided 95% t quantiles by degrees of freedom (paired CIs over seeds)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def _ci(vals: list[float]) -> str:
    n = len(vals)
    if n == 0:
        return "–"
    m = sum(vals) / n
    if n == 1:
        return f"{m:.2f}"
    sd = (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5
    return f"{m:.2f} ± {_T95.get(n - 1, 1.96) * sd / n ** 0.5:.2f}"


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
    profile = rows[0].get("profile") if rows else None
    if profile != "full":
        lines += ["", f"This is the **{profile}** profile (a width-{cfg.width}, depth-{cfg.depth} DiT, "
                      f"{cfg.pretrain_steps} pre-training and {cfg.transfer_steps} transfer steps). Where the "
                      "samples are not meaningful, the ranking of the arms is not evidence for or against KIND; the "
                      "full (GPU) profile is the larger test."]
    return Figures(paths, "\n".join(lines) + "\n")
