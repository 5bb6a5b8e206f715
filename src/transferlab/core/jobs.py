"""Side-by-side processes: the demo's experiments, and `run --jobs N`'s (arm, seed) runs.

Why processes and not threads or DDP: the experiments train small models, which leave a GPU (or a
CPU core's worth of threads) mostly idle, so several independent runs side by side finish sooner
than one run with more resources. Each process gets `cores // jobs` torch threads (oversubscribing
cores is many times slower on small ops; see `engine.default_threads`).

`run --jobs N` shares the work through claim files: every worker walks the same list of unfinished
(arm, seed) runs and takes the first one whose claim file it creates first (`O_EXCL`), so a worker
that finishes early simply takes the next run. The list is walked arm by arm, so workers that start
together take different seeds and do not pre-train the same per-seed cache twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .engine import default_threads


def job_env(jobs: int) -> tuple[dict, int]:
    """Environment for `jobs` child processes sharing this machine's cores, and their thread count."""
    threads = max(1, default_threads(1) // jobs)
    return {**os.environ, "TRANSFERLAB_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}, threads


def run_side_by_side(commands: list[tuple[str, list[str], Path]], jobs: int, tag: str,
                     module: str = "transferlab") -> list[tuple[str, int, float]]:
    """Run `python -m module *argv` for each (label, argv, log file), `jobs` at a time.

    Returns (label, exit code, seconds) for each command."""
    env, _ = job_env(jobs)

    def one(cmd: tuple[str, list[str], Path]) -> tuple[str, int, float]:
        label, argv, log = cmd
        log.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        print(f"[{tag}] {label}: started", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, "-m", module, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                 env=env)
        dt = time.perf_counter() - t
        print(f"[{tag}] {label}: {'done' if rc == 0 else f'FAILED (exit {rc}), see ' + str(log)} in {dt:.0f}s",
              flush=True)
        return label, rc, dt

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, commands))


def claim(claim_dir: Path, key: str) -> bool:
    """True for exactly one of the processes that call this with the same key."""
    try:
        os.close(os.open(claim_dir / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def fresh_claim_dir(exp_dir: Path) -> Path:
    """A claims folder private to this invocation (stale claims of a killed run never block a rerun)."""
    d = exp_dir / f".claims-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d
