"""Running an experiment's arms over seeds: one `RunContext` per (arm, seed), one results line each.

A rerun skips (arm, seed) pairs that already have a line for the same config hash; an interrupted
pair resumes from its last checkpoint and its finished stages (see `core.context`). The folder
layout is described in `core.results`.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import config_hash, to_dict
from .context import RunContext
from .engine import Engine
from .io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from .jobs import claim
from .registry import get_experiment
from .report import write_experiment_report, write_report
from .results import check_writable, resolve_config, versions


def run_experiment(name: str, profile: str = "quick", seeds: int | None = None, overrides=None,
                   out: str | Path = "results", engine: Engine | None = None, report: bool = True,
                   claim_dir: Path | None = None) -> Path:
    """Run every (seed, arm) of an experiment that is not finished yet; returns the experiment folder.

    With `claim_dir` this process is one of several workers (`transferlab run --jobs N`): it runs only
    the (arm, seed) pairs it claims first, walking arm by arm (see `core.jobs`).
    """
    exp = get_experiment(name)
    cfg = resolve_config(exp, profile, overrides, seeds)
    out_dir = Path(out) / name
    check_writable(out_dir)
    engine = engine or Engine()
    h = config_hash(cfg)
    log = out_dir / "results.jsonl"
    if engine.is_main:
        atomic_write_json(out_dir / "latest.json", {"config_hash": h, "profile": profile, "config": to_dict(cfg)})
    done = {(r["arm"], r["seed"]) for r in read_jsonl(log) if r.get("config_hash") == h}
    todo = [(s, a) for s in range(cfg.seeds) for a in cfg.arms if (a, s) not in done]
    engine.print0(f"[{name}] profile={profile} config={h}: {len(todo)} of {cfg.seeds * len(cfg.arms)} runs to do")
    if claim_dir is not None:
        todo.sort(key=lambda sa: (cfg.arms.index(sa[1]), sa[0]))
    for seed, arm in todo:
        if claim_dir is not None and not claim(Path(claim_dir), f"{h}-{arm}-seed{seed}"):
            continue
        run_dir = out_dir / "runs" / h / f"{arm}-seed{seed}"
        engine.run_dir = run_dir
        engine.seed(seed)
        ctx = RunContext(engine, out_dir, h, arm, seed, run_dir)
        resumed = engine.checkpoint_path.exists() or (run_dir / "stages").exists()
        engine.print0(f"[{name}] arm={arm} seed={seed}" + (" (resuming from checkpoint)" if resumed else ""))
        t0 = time.perf_counter()
        metrics = exp.fn(cfg, arm, seed, ctx)
        wall = time.perf_counter() - t0
        if engine.is_main:
            record = {"experiment": name, "arm": arm, "seed": seed, "profile": profile, "config_hash": h,
                      "metrics": metrics, "wall_s": round(wall, 3), "device": str(engine.device),
                      "processes": engine.num_processes, "versions": versions(), "resumed": resumed}
            if ctx.choices:
                record["choices"] = ctx.choices
            append_jsonl(log, record)
            atomic_write_text(run_dir / "done", "ok\n")
            if engine.checkpoint_path.exists():
                engine.checkpoint_path.unlink()  # finished runs keep only their line in results.jsonl
            ctx.finish()
            summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            engine.print0(f"[{name}] arm={arm} seed={seed}: {summary} ({wall:.1f}s)")
        engine.wait()
    engine.run_dir = None
    if report and engine.is_main:
        write_experiment_report(out_dir)
    return out_dir


def report_run(engine: Engine, out: str | Path, out_dir: Path, full_report: bool = True) -> None:
    """After a run: the whole report (unless skipped) and the experiment's table, on the main process."""
    if not engine.is_main:
        return
    if full_report:
        write_report(out)
    print(f"table: {out_dir / 'table.md'}\n" + (out_dir / "table.md").read_text(), flush=True)
