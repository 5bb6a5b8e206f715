"""Published results: reported runs committed under docs/results/, tables generated from them.

    transferlab report --out results --publish docs/results

copies each experiment's results (the rows of its last config) into `docs/results/<experiment>/`,
generates its tables and plots there, and refreshes every generated block in README.md and
docs/*.md. A block is written as

    <!-- table: cuber-pfmnist -->       (or `<!-- table: NAME full -->` for every metric)
    ...generated, never edited by hand...
    <!-- /table -->

and `<!-- summary -->...<!-- /summary -->` holds one line per published experiment (method minus
reference on its primary metric, 95% CI, minimal detectable effect and verdict).

Per-example files that a plot hook reads (`<experiment>/details/<config hash>/`) are copied with the
rows, so the published plots are drawn from committed files too. A second run of the same experiment
under another profile (learning curves beside a confirmatory run) is published under its own name:
`--only emoe-wordnet --as emoe-wordnet-curves` writes `docs/results/emoe-wordnet-curves/`, whose
latest.json names the experiment it belongs to.

`check_published` regenerates every table from its committed results.jsonl and reports any
difference, so a number typed by hand into a published table or block fails the test suite.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError
from .io import atomic_write_json, atomic_write_text, read_jsonl
from .registry import experiments
from .report import headline, render_experiment, summary_markdown, write_experiment_report
from .results import latest_rows, result_arms

BLOCK = re.compile(r"(<!-- table: ([a-z0-9-]+)(?: (full))? -->\n)(.*?)(<!-- /table -->)", re.S)


def publish(out: str | Path, dest: str | Path, names: list[str] | None = None,
            docs: list[Path] | None = None, alias: str | None = None) -> list[str]:
    """Copy the latest results of each experiment under `out` (or just `names`) into `dest`.

    `alias` publishes the one experiment in `names` as `dest/<alias>` instead of `dest/<experiment>`.
    Returns the names published. Docs with generated blocks are refreshed from `dest`.
    """
    out, dest = Path(out), Path(dest)
    known = experiments()
    if alias is not None:
        if not names or len(names) != 1:
            raise UserError("--as publishes one experiment under another name; name it with one --only")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", alias) or alias in known:
            raise UserError(f"--as {alias!r}: use lower-case letters, digits and dashes, and not the name of "
                            "another experiment (e.g. emoe-wordnet-curves)")
    chosen = names or [n for n in known if (out / n / "latest.json").exists()]
    published = []
    for name in chosen:
        if name not in known:
            raise UserError(f"unknown experiment {name!r}; `transferlab list` shows: {', '.join(known)}")
        rows, latest = latest_rows(out / name)
        if not rows:
            raise UserError(f"{out / name} has no results to publish; run `transferlab run {name}` first")
        target = dest / (alias or name)
        arms = result_arms(rows, latest, known[name].known_arms)
        rows = sorted(rows, key=lambda r: (arms.index(r["arm"]), r["seed"]))
        atomic_write_text(target / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        _copy_details(out / name, target, {r["config_hash"] for r in rows})
        atomic_write_json(target / "latest.json", {**latest, "experiment": name} if alias else latest)
        write_experiment_report(target)
        published.append(alias or name)
    refresh_docs(dest, docs if docs is not None else default_docs(dest))
    return published


def _copy_details(src: Path, target: Path, hashes: set[str]) -> None:
    """The per-example files of the published configs (a plot hook's inputs), replacing older copies."""
    import shutil

    for h in sorted(hashes):
        d = src / "details" / h
        if d.is_dir():
            shutil.rmtree(target / "details" / h, ignore_errors=True)
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                dst = target / "details" / h / f.relative_to(d)
                if f.suffix == ".json":  # one line per file: per-example lists, not one number per line
                    atomic_write_text(dst, json.dumps(json.loads(f.read_text()), separators=(",", ":")) + "\n")
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dst)
    stale = target / "details"
    if stale.is_dir():  # details of configs no longer published
        for d in stale.iterdir():
            if d.name not in hashes:
                shutil.rmtree(d)


def default_docs(dest: Path) -> list[Path]:
    """README.md and docs/*.md of the repository that holds `dest` (docs/results)."""
    root = Path(dest).resolve().parent.parent
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def _block_text(dest: Path, name: str, full: bool) -> str:
    r = render_experiment(dest / name)
    if r is None:
        raise UserError(f"a generated block names {name!r}, which is not published under {dest}; "
                        f"run `transferlab report --publish {dest}` after running it")
    return r["full_table"] if full else r["table"]


SUMMARY_BLOCK = re.compile(r"(<!-- summary -->\n)(.*?)(<!-- /summary -->)", re.S)


def summary_text(dest: Path, doc: Path) -> str:
    """The summary table of every published experiment, linked relative to `doc`."""
    import os

    heads = [headline(r) for d in _published_dirs(dest) if (r := render_experiment(d)) is not None]
    rel = Path(os.path.relpath(Path(dest).resolve(), Path(doc).resolve().parent))
    return summary_markdown(heads, link=f"{rel.as_posix()}/{{}}/table.md")


def _published_dirs(dest: Path) -> list[Path]:
    return sorted(p for p in Path(dest).iterdir() if p.is_dir()) if Path(dest).exists() else []


def _generated(dest: Path, doc: Path, text: str) -> str:
    text = BLOCK.sub(lambda m: m.group(1) + _block_text(dest, m.group(2), bool(m.group(3))) + m.group(5), text)
    if SUMMARY_BLOCK.search(text):
        summary = summary_text(dest, doc)
        text = SUMMARY_BLOCK.sub(lambda m: m.group(1) + summary + m.group(3), text)
    return text


def refresh_docs(dest: Path, docs: list[Path]) -> None:
    for doc in docs:
        text = doc.read_text()
        new = _generated(dest, doc, text)
        if new != text:
            atomic_write_text(doc, new)


def check_published(dest: str | Path, docs: list[Path] | None = None) -> list[str]:
    """Differences between the committed tables and blocks and what their results.jsonl generate."""
    dest = Path(dest)
    problems = []
    for d in _published_dirs(dest):
        if not read_jsonl(d / "results.jsonl"):
            problems.append(f"{d}: no results.jsonl")
            continue
        r = render_experiment(d)
        for fname, want in (("table.md", r["table"]), ("table.csv", r["csv"])):
            have = (d / fname).read_text() if (d / fname).exists() else None
            if have != want:
                problems.append(f"{d / fname} differs from the table its results.jsonl generates")
    for doc in docs if docs is not None else default_docs(dest):
        text = doc.read_text()
        if _generated(dest, doc, text) != text:
            problems.append(f"{doc}: a generated block differs from what {dest} generates; "
                            f"run `transferlab report --publish {dest}`")
    return problems


# ---- benchmarks --------------------------------------------------------------------------------
BENCH_BLOCK = re.compile(r"(<!-- bench(?:: ([a-z0-9-]+))? -->\n)(.*?)(<!-- /bench -->)", re.S)


def machine_info(device: str, threads: int) -> dict:
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        cpu = torch.cuda.get_device_name()
    return {"device": device, "hardware": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def publish_bench(path: str | Path, results: dict[str, list], machine: dict) -> Path:
    """Merge benchmark rows ({benchmark: [Comparison...]}) into `path` (bench.json) and write bench.md beside it."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    for name, rows in results.items():
        data[f"{name}@{machine['device']}"] = {"machine": machine, "rows": [r.to_dict() for r in rows]}
    atomic_write_json(path, data)
    atomic_write_text(path.with_suffix(".md"), bench_markdown(data))
    refresh_bench_docs(path, default_docs(path.parent))
    return path


def bench_markdown(data: dict, only: str | None = None) -> str:
    """One table per machine: the rows of every benchmark (or just `only`) measured there.

    `only="targets"` keeps every benchmark's rows that carry a target (the README's short table)."""
    from .bench import Comparison, format_comparisons

    groups: dict[str, list] = {}
    for key in sorted(data):
        if only not in (None, "targets") and key.split("@")[0] != only:
            continue
        m = data[key]["machine"]
        label = (f"{m['hardware']}, {m['device']}, {m['threads']} thread(s), torch {m['torch']}, "
                 f"measured {m['date']}")
        rows = [r for r in data[key]["rows"] if only != "targets" or r.get("target") is not None]
        groups.setdefault(label, []).extend(rows)
    fields = {"name", "candidate", "baseline", "value", "reference", "target", "mode", "unit", "note"}
    parts = []
    for label, rows in groups.items():
        comps = [Comparison(**{k: v for k, v in r.items() if k in fields}) for r in rows]
        parts.append(f"{label}:\n\n{format_comparisons(comps)}\n")
    return "\n".join(parts)


def _bench_blocks(data: dict, text: str) -> str:
    return BENCH_BLOCK.sub(lambda m: m.group(1) + bench_markdown(data, m.group(2)) + m.group(4), text)


def refresh_bench_docs(path: Path, docs: list[Path]) -> None:
    data = json.loads(Path(path).read_text())
    for doc in docs:
        text = doc.read_text()
        new = _bench_blocks(data, text)
        if new != text:
            atomic_write_text(doc, new)


def check_bench(path: str | Path, docs: list[Path] | None = None) -> list[str]:
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    problems = []
    if path.with_suffix(".md").read_text() != bench_markdown(data):
        problems.append(f"{path.with_suffix('.md')} differs from what {path.name} generates")
    for doc in docs if docs is not None else default_docs(path.parent):
        text = doc.read_text()
        if _bench_blocks(data, text) != text:
            problems.append(f"{doc}: a bench block differs from {path}; run `transferlab bench --publish {path}`")
    return problems
