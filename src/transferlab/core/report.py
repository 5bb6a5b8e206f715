"""Tables (Markdown, CSV), plots (PNG) and the self-contained `report.html`.

Each experiment's table gives, per arm, the mean ± 95% CI over seeds of each metric, and the
paired difference (same seeds) to the experiment's reference arm.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from .io import atomic_write_text
from .registry import experiments, get_experiment
from .results import latest_rows
from .stats import fmt_ci, mean_ci, paired_diff


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(rows: list[dict], arms, reference: str, metrics) -> list[dict]:
    """One dict per arm: n and, for each metric, (mean, ci) and the paired diff to the reference."""
    by_arm: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        for m, v in r["metrics"].items():
            if _scalar(v):
                by_arm.setdefault(r["arm"], {}).setdefault(m, {})[r["seed"]] = float(v)
    out = []
    for arm in arms:
        if arm not in by_arm:
            continue
        entry = {"arm": arm, "n": max(len(v) for v in by_arm[arm].values())}
        for m in metrics:
            vals = by_arm[arm].get(m, {})
            entry[m] = mean_ci(vals.values())
            ref = by_arm.get(reference, {}).get(m, {})
            entry["Δ" + m] = paired_diff(vals, ref) if arm != reference and ref else None
        out.append(entry)
    return out


def table_markdown(summary: list[dict], metrics, reference: str) -> str:
    head = ["arm", "n"] + list(metrics) + [f"Δ{m} vs {reference}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["arm"] + (" (ref)" if e["arm"] == reference else ""), str(e["n"])]
        cells += [fmt_ci(*e[m][:2]) for m in metrics]
        cells += ["–" if e["Δ" + m] is None else fmt_ci(*e["Δ" + m][:2]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(summary: list[dict], metrics) -> str:
    cols = ["arm", "n"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_ci95", f"diff_{m}_mean", f"diff_{m}_ci95"]
    lines = [",".join(cols)]
    for e in summary:
        row = [e["arm"], str(e["n"])]
        for m in metrics:
            d = e["Δ" + m] or (math.nan, math.nan, 0)
            row += [f"{e[m][0]:.6g}", f"{e[m][1]:.6g}", f"{d[0]:.6g}", f"{d[1]:.6g}"]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def bar_plot(summary: list[dict], metric: str, path: Path, title: str) -> Path:
    """Bar chart of one metric per arm with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [e["arm"] for e in summary]
    means = [e[metric][0] for e in summary]
    errs = [0.0 if math.isnan(e[metric][1]) else e[metric][1] for e in summary]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(arms)), 3.2))
    ax.bar(range(len(arms)), means, yerr=errs, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        lo, hi = min(finite), max(m + e for m, e in zip(means, errs) if not math.isnan(m))
        ax.set_ylim(max(0.0, lo - (hi - lo) * 0.6 - 1e-9), hi + (hi - lo) * 0.15 + 1e-9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_experiment_report(out_dir: Path) -> str | None:
    """Write table.md, table.csv and plots for one experiment folder; returns the Markdown section."""
    out_dir = Path(out_dir)
    rows, latest = latest_rows(out_dir)
    if not rows:
        return None
    exp = get_experiment(out_dir.name)
    arms = latest["config"]["arms"]
    summary = summarize(rows, arms, exp.reference, exp.metrics)
    md = table_markdown(summary, exp.metrics, exp.reference)
    atomic_write_text(out_dir / "table.md", md)
    atomic_write_text(out_dir / "table.csv", table_csv(summary, exp.metrics))
    seeds = max(e["n"] for e in summary)
    bar_plot(summary, exp.primary_metric, out_dir / "metric.png",
             f"{exp.name} ({latest['profile']}, {seeds} seed(s)): {exp.primary_metric}, 95% CI")
    if exp.plot is not None:
        exp.plot(rows, latest["config"], out_dir)
    header = (f"## {exp.name}\n\n{exp.description}\n\nProfile `{latest['profile']}`, config `{latest['config_hash']}`, "
              f"mean ± 95% CI over seeds; Δ = paired difference to `{exp.reference}`.\n\n")
    notes = out_dir / "notes.md"  # an experiment may write its own caveats (e.g. "samples not meaningful")
    section = header + md + ("\n" + notes.read_text() if notes.exists() else "")
    atomic_write_text(out_dir / "section.md", section)
    return section


def write_report(out: str | Path = "results") -> tuple[Path, Path]:
    """Collect every experiment folder under `out` into report.md and a self-contained report.html."""
    out = Path(out)
    md_parts = ["# transferlab report\n"]
    html_parts = ["<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>",
                  "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                  "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
                  "img{max-width:100%;margin:6px 0}</style></head><body><h1>transferlab report</h1>"]
    for name in experiments():
        d = out / name
        if not d.is_dir():
            continue
        section = write_experiment_report(d)
        if section is None:
            continue
        pngs = sorted(d.glob("*.png"))
        md_parts.append(section + "\n" + "".join(f"![{p.stem}]({name}/{p.name})\n" for p in pngs))
        html_parts.append(_md_to_html(section))
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            html_parts.append(f"<figure><img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>"
                              f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    html_parts.append("</body></html>")
    md_path = atomic_write_text(out / "report.md", "\n".join(md_parts))
    html_path = atomic_write_text(out / "report.html", "\n".join(html_parts))
    return md_path, html_path


def _md_to_html(md: str) -> str:
    """Just enough Markdown for our sections: headings, tables, paragraphs, lists."""
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            t = "<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                                 for c in row) + "</tr>" for i, row in enumerate(cells)) + "</table>"
            out.append(t)
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)
