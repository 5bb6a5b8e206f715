"""Tables (Markdown, CSV), plots (PNG) and the self-contained `report.html`.

Each experiment's table gives, per arm, the mean ± 95% CI over seeds of each metric, and the
paired difference (same seeds) to the experiment's reference arm.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from .config import config_from_dict
from .io import atomic_write_text
from .registry import Figures, experiments, get_experiment
from .results import latest_rows, result_arms
from .stats import fmt_ci, mean_ci, minimal_detectable_effect, paired_diff, paired_values, verdict


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


def choices_markdown(rows: list[dict], arms) -> str:
    """What `choose_on_validation` picked, per arm: each choice's chosen values and how many seeds chose them."""
    picks: dict[tuple[str, str], dict[str, int]] = {}
    candidates: dict[tuple[str, str], list] = {}  # per arm: arms of one experiment may search other grids
    for r in rows:
        for name, c in (r.get("choices") or {}).items():
            counts = picks.setdefault((r["arm"], name), {})
            counts[str(c["chosen"])] = counts.get(str(c["chosen"]), 0) + 1
            candidates.setdefault((r["arm"], name), c["candidates"])
    if not picks:
        return ""
    lines = ["Chosen on validation (value: seeds):", ""]
    for arm in arms:
        for a, name in candidates:
            if a == arm:
                counts = ", ".join(f"{v}: {n}" for v, n in sorted(picks[(arm, name)].items()))
                lines.append(f"- `{arm}` {name} from {candidates[(arm, name)]}: {counts}")
    return "\n".join(lines) + "\n"


def render_experiment(out_dir: Path) -> dict | None:
    """The tables of one experiment folder, computed from its results.jsonl and latest.json (no files written).

    Returns None for a folder without results, else a dict with the Markdown `table` (headline metrics),
    `full_table` (every declared metric), `csv`, `choices`, the `summary` rows and the `latest` config.
    """
    rows, latest = latest_rows(Path(out_dir))
    if not rows:
        return None
    # a folder published under another name (`--as`) says which experiment its rows belong to
    exp = get_experiment(latest.get("experiment") or Path(out_dir).name)
    arms = result_arms(rows, latest, exp.known_arms)
    summary = summarize(rows, arms, exp.reference, exp.metrics)
    return {"exp": exp, "name": Path(out_dir).name, "rows": rows, "latest": latest, "summary": summary,
            "table": table_markdown(summary, exp.headline_metrics, exp.reference),
            "full_table": table_markdown(summary, exp.metrics, exp.reference),
            "csv": table_csv(summary, exp.metrics), "choices": choices_markdown(rows, arms)}


def headline(r: dict) -> dict:
    """The one-line summary of an experiment: method arm minus baseline arm on the primary metric."""
    exp, summary = r["exp"], r["summary"]
    arms = [e["arm"] for e in summary]
    method, base = exp.method_arm(arms), exp.baseline or exp.reference
    metric = exp.primary_metric
    per_seed = {arm: {row["seed"]: float(row["metrics"][metric]) for row in r["rows"]
                      if row["arm"] == arm and _scalar(row["metrics"].get(metric))} for arm in (method, base)}
    diffs = paired_values(per_seed[method], per_seed[base]) if method in arms and base in arms else []
    diff = mean_ci(diffs) if diffs else None
    mde = minimal_detectable_effect(diffs)
    words = "–" if diff is None else verdict(diff[0], diff[1], mde, exp.higher_is_better(metric))
    return {"experiment": r["name"], "profile": r["latest"]["profile"], "reference": base,
            "method": method, "metric": metric, "diff": diff,
            "n": 0 if diff is None else diff[2], "mde": mde, "verdict": words}


def summary_markdown(heads: list[dict], link: str = "#{}") -> str:
    """One row per experiment: method − reference on the primary metric, its CI, MDE and a verdict.

    `link` formats each experiment's link target (an anchor in the report, a file in the docs)."""
    lines = ["| experiment | profile | method − baseline | metric | paired Δ (95% CI) | seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for h in heads:
        smoke = " (smoke run)" if h["profile"] == "quick" else ""
        diff = "–" if h["diff"] is None else fmt_ci(*h["diff"][:2])
        lines.append(f"| [{h['experiment']}]({link.format(h['experiment'])}) | `{h['profile']}`{smoke} | "
                     f"`{h['method']}` − `{h['reference']}` | {h['metric']} | {diff} | {h['n']} | {h['verdict']} |")
    return "\n".join(lines) + "\n"


def write_experiment_report(out_dir: Path) -> tuple[str, list[Path]] | None:
    """Write table.md, table.csv, section.md and plots for one experiment folder.

    Returns the Markdown section and the figures (the metric bars, then the plot hook's)."""
    out_dir = Path(out_dir)
    r = render_experiment(out_dir)
    if r is None:
        return None
    exp, latest, summary = r["exp"], r["latest"], r["summary"]
    atomic_write_text(out_dir / "table.md", r["table"])
    atomic_write_text(out_dir / "table.csv", r["csv"])
    seeds = max(e["n"] for e in summary)
    bar_plot(summary, exp.primary_metric, out_dir / "metric.png",
             f"{r['name']} ({latest['profile']}, {seeds} seed(s)): {exp.primary_metric}, 95% CI")
    figures = Figures()
    if exp.plot is not None:
        figures = _call_plot(exp, r["rows"], latest["config"], out_dir)
    profiles = [latest["profile"]] + sorted({row.get("profile") for row in r["rows"]} - {latest["profile"], None})
    header = (f"## {r['name']}\n\n{exp.description}\n\n"
              f"{'Profile' if len(profiles) == 1 else 'Profiles'} {' + '.join(f'`{p}`' for p in profiles)}, "
              f"config `{latest['config_hash']}`, "
              f"mean ± 95% CI over seeds; Δ = paired difference to `{exp.reference}`.\n\n")
    full = ("" if r["full_table"] == r["table"]
            else f"\n<details><summary>all metrics</summary>\n\n{r['full_table']}\n</details>\n")
    section = (header + r["table"] + full + ("\n" + r["choices"] if r["choices"] else "")
               + ("\n" + figures.notes if figures.notes else ""))
    atomic_write_text(out_dir / "section.md", section)
    return section, [out_dir / "metric.png", *[Path(p) for p in figures.paths]]


def _call_plot(exp, rows, cfg_dict, out_dir) -> Figures:
    figures = exp.plot(rows, config_from_dict(exp.config, cfg_dict), out_dir)
    if not isinstance(figures, Figures):
        raise TypeError(f"the plot hook of {exp.name} must return core.registry.Figures, got {type(figures)}")
    return figures


SMOKE_NOTE = ("Rows from the `quick` profile are smoke runs (tiny data, few seeds): they show that an experiment "
              "runs end to end, not whether the method works. The reported results are the `cpu` profiles "
              "published under [docs/results/](../docs/results/), summarised in the README.")


def write_report(out: str | Path = "results") -> tuple[Path, Path]:
    """Collect every experiment folder under `out` into report.md and a self-contained report.html.

    Both open with a one-screen summary (method − reference on each primary metric) and a table of
    contents; each section shows the headline metrics, with every declared metric in a folded block."""
    out = Path(out)
    sections, heads = [], []
    for name in experiments():
        d = out / name
        if not d.is_dir():
            continue
        written = write_experiment_report(d)
        if written is None:
            continue
        heads.append(headline(render_experiment(d)))
        sections.append((name, written[0], written[1]))
    summary = summary_markdown(heads)
    md_parts = ["# transferlab report\n", SMOKE_NOTE + "\n", "## Summary\n", summary]
    md_parts += [section + "\n" + "".join(f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in pngs)
                 for name, section, pngs in sections]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}"
             "td:first-child,th:first-child{text-align:left}td:last-child{white-space:normal;min-width:12em}"
             "img{max-width:100%;height:auto;margin:6px 0}"
             "nav li{margin:2px 0}.note{background:#f6f6e8;padding:6px 10px;border-left:4px solid #cc9}")
    html_parts = ["<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>",
                  f"<style>{style}</style></head><body><h1>transferlab report</h1>",
                  f"<p class='note'>{_inline(SMOKE_NOTE)}</p><h2>Summary</h2>", _md_to_html(summary),
                  "<nav><h2>Contents</h2><ul>" + "".join(f"<li><a href='#{n}'>{html.escape(n)}</a></li>"
                                                         for n, _, _ in sections) + "</ul></nav>"]
    for name, section, pngs in sections:
        html_parts.append(f"<section id='{html.escape(name)}'>" + _md_to_html(section))
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            html_parts.append(f"<figure><img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>"
                              f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
        html_parts.append("</section>")
    html_parts.append("</body></html>")
    md_path = atomic_write_text(out / "report.md", "\n".join(md_parts))
    html_path = atomic_write_text(out / "report.html", "\n".join(html_parts))
    return md_path, html_path


def _inline(text: str) -> str:
    """Escaped text with `code` and [links](#anchors) rendered."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", t)


def _md_to_html(md: str) -> str:
    """Just enough Markdown for our sections: headings, tables, paragraphs, lists, folded blocks."""
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            t = "<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{_inline(c)}</{'th' if i == 0 else 'td'}>"
                                 for c in row) + "</tr>" for i, row in enumerate(cells)) + "</table>"
            out.append(t)
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith(("<details>", "</details>")):
            out.append(line)  # our own folded blocks pass through
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)
