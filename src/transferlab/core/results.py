"""Running an experiment's arms over seeds into an append-only results log, with resume.

Layout under `--out` (default `results/`):

    <experiment>/results.jsonl                 one JSON line per finished (arm, seed, config hash)
    <experiment>/latest.json                   the config (and its hash) of the last invocation
    <experiment>/runs/<hash>/<arm>-seed<k>/    checkpoint.pt while running, `done` when finished
    <experiment>/table.md, table.csv, *.png    written by `core.report`

A rerun skips (arm, seed) pairs that already have a line for the same config hash, and an
interrupted pair resumes from its last checkpoint (see `Engine.save_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from .config import config_hash, to_dict
from .engine import Engine
from .errors import UserError
from .io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from .jobs import claim
from .registry import Experiment, get_experiment


def check_writable(out: Path) -> None:
    """Fail early, with a one-line error, when results cannot be written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"results folder {str(out)!r} is not writable ({e.strerror}); pass --out DIR") from None


def versions() -> dict:
    import numpy

    from .. import __version__

    v = {"transferlab": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
         "python": platform.python_version()}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except ImportError:
        pass
    return v


def resolve_config(exp: Experiment, profile: str, overrides: list[str] | dict | None, seeds: int | None):
    cfg = exp.make_config(profile, overrides)
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        cfg = dataclasses.replace(cfg, seeds=seeds)
    config_arms = {f.name: f.default for f in dataclasses.fields(exp.config)}["arms"]
    unknown = [a for a in cfg.arms if a not in config_arms]
    if unknown:
        raise UserError(f"unknown arm(s) {unknown} for {exp.name}; choose from {list(config_arms)}")
    return cfg


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
        resumed = engine.checkpoint_path.exists()
        engine.print0(f"[{name}] arm={arm} seed={seed}" + (" (resuming from checkpoint)" if resumed else ""))
        t0 = time.perf_counter()
        metrics = exp.fn(cfg, arm, seed, engine)
        wall = time.perf_counter() - t0
        if engine.is_main:
            record = {"experiment": name, "arm": arm, "seed": seed, "profile": profile, "config_hash": h,
                      "metrics": metrics, "wall_s": round(wall, 3), "device": str(engine.device),
                      "processes": engine.num_processes, "versions": versions(), "resumed": resumed}
            append_jsonl(log, record)
            atomic_write_text(run_dir / "done", "ok\n")
            if engine.checkpoint_path.exists():
                engine.checkpoint_path.unlink()  # finished runs keep only their line in results.jsonl
            summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            engine.print0(f"[{name}] arm={arm} seed={seed}: {summary} ({wall:.1f}s)")
        engine.wait()
    engine.run_dir = None
    if report and engine.is_main:
        from .report import write_experiment_report

        write_experiment_report(out_dir)
    return out_dir


def latest_rows(out_dir: Path) -> tuple[list[dict], dict | None]:
    """Rows of the last invocation's config hash, and its latest.json."""
    out_dir = Path(out_dir)
    latest_file = out_dir / "latest.json"
    if not latest_file.exists():
        return [], None
    import json

    latest = json.loads(latest_file.read_text())
    arms = set(latest["config"].get("arms", ()))
    rows = [r for r in read_jsonl(out_dir / "results.jsonl")
            if r.get("config_hash") == latest["config_hash"] and (not arms or r["arm"] in arms)]
    return rows, latest
