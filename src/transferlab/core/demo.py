"""`transferlab demo`: every experiment's quick profile, several at a time, then the report.

Why processes side by side: the quick profiles train small models, whose ops use extra threads
poorly, while two 1-thread processes keep two cores busy. Oversubscribing is worse than either
(measured on 2 cores: a 2-thread run next to a busy core was ~9x slower), so each job gets
cores // jobs threads (see `core.jobs`).
"""

from __future__ import annotations

from pathlib import Path

from .engine import default_threads
from .errors import UserError
from .jobs import job_env, run_side_by_side


def run_demo(names: list[str], out: Path, jobs: int | None = None,
             device: str = "auto") -> list[tuple[str, int, float]]:
    """Run `transferlab run NAME --profile quick` for each name in parallel subprocesses.

    Each job's output goes to `<out>/<name>/demo.log`. Returns (name, exit code, seconds) per job.
    """
    jobs = max(1, min(jobs or default_threads(1), len(names)))
    _, threads = job_env(jobs)
    print(f"[demo] {len(names)} experiments, {jobs} at a time, {threads} thread(s) each; logs in {out}/<name>/demo.log",
          flush=True)
    commands = [(name, ["run", name, "--profile", "quick", "--out", str(out), "--device", device, "--no-report"],
                 out / name / "demo.log") for name in names]
    results = run_side_by_side(commands, jobs, "demo")
    failed = [n for n, rc, _ in results if rc != 0]
    if failed:
        raise UserError(f"demo experiments failed: {', '.join(failed)}; their logs are in {out}/<name>/demo.log")
    return results
