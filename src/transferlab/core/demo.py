"""`transferlab demo`: every experiment's quick profile, several at a time, then the report.

Why processes side by side: the quick profiles train small models, whose ops use extra threads
poorly, while two 1-thread processes keep two cores busy. Oversubscribing is worse than either
(measured on 2 cores: a 2-thread run next to a busy core was ~9x slower), so each job gets
cores // jobs threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .engine import default_threads
from .errors import UserError


def run_demo(names: list[str], out: Path, jobs: int | None = None,
             device: str = "auto") -> list[tuple[str, int, float]]:
    """Run `transferlab run NAME --profile quick` for each name in parallel subprocesses.

    Each job's output goes to `<out>/<name>/demo.log`. Returns (name, exit code, seconds) per job.
    """
    cores = default_threads(1)
    jobs = max(1, min(jobs or cores, len(names)))
    threads = max(1, cores // jobs)
    env = {**os.environ, "TRANSFERLAB_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    print(f"[demo] {len(names)} experiments, {jobs} at a time, {threads} thread(s) each; logs in {out}/<name>/demo.log",
          flush=True)

    def one(name: str) -> tuple[str, int, float]:
        log = out / name / "demo.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        print(f"[demo] {name}: started", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, "-m", "transferlab", "run", name, "--profile", "quick",
                                  "--out", str(out), "--device", device, "--no-report"],
                                 stdout=fh, stderr=subprocess.STDOUT, env=env)
        dt = time.perf_counter() - t
        print(f"[demo] {name}: {'done' if rc == 0 else f'FAILED (exit {rc}), see ' + str(log)} in {dt:.0f}s",
              flush=True)
        return name, rc, dt

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, names))
    failed = [n for n, rc, _ in results if rc != 0]
    if failed:
        raise UserError(f"demo experiments failed: {', '.join(failed)}; their logs are in {out}/<name>/demo.log")
    return results
