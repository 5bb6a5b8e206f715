"""The results folder of an experiment: an append-only results log, with resume.

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
from pathlib import Path

import torch

from .errors import UserError
from .io import read_jsonl
from .registry import Experiment


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
    known = exp.known_arms
    unknown = [a for a in cfg.arms if a not in known]
    if unknown:
        raise UserError(f"unknown arm(s) {unknown} for {exp.name}; choose from {list(known)}")
    return cfg


def latest_rows(out_dir: Path) -> tuple[list[dict], dict | None]:
    """Rows of the last invocation's config hash and arms, and its latest.json.

    Profiles that differ only in their arms or seeds share a hash: rows of the same config run under
    another profile join too, so a `cpu` profile and a `cpu-long` profile that runs other arms of
    the config form one table (while `--set arms=...` under the same profile narrows the table)."""
    out_dir = Path(out_dir)
    latest_file = out_dir / "latest.json"
    if not latest_file.exists():
        return [], None
    import json

    latest = json.loads(latest_file.read_text())
    arms = set(latest["config"].get("arms", ()))
    rows = [r for r in read_jsonl(out_dir / "results.jsonl") if r.get("config_hash") == latest["config_hash"]
            and (not arms or r["arm"] in arms or r.get("profile") != latest["profile"])]
    return rows, latest


def result_arms(rows: list[dict], latest: dict, known: tuple[str, ...] = ()) -> list[str]:
    """The arms of a table: the last invocation's, then the others found in `rows` in `known` order."""
    arms = list(latest["config"].get("arms", ()))
    present = {r["arm"] for r in rows}
    order = list(known) + sorted(present - set(known))
    return arms + [a for a in order if a in present and a not in arms]
