"""`transferlab` command line: list | show | run | demo | report | bench.

User errors (unknown names, bad --set values, missing data, unwritable folders) print one line
and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("list", help="experiments (with their profiles) and benchmarks")
    sh = sub.add_parser("show", help="an experiment's arms, metrics, profiles and every config option with its help")
    sh.add_argument("name")

    r = sub.add_parser("run", help="run an experiment's arms over seeds; skips finished runs, resumes others")
    r.add_argument("name")
    r.add_argument("--profile", default="quick", help="quick (CPU minutes) or full (paper-scale; GPU)")
    r.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1); default from the profile")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=1e-3 --set arms=finetune,scratch")
    r.add_argument("--out", default="results", help="results folder (default: results)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    r.add_argument("--no-report", action="store_true", help="skip rebuilding report.md/html (the demo does it once)")
    r.add_argument("--jobs", type=int, default=1,
                   help="(arm, seed) runs side by side in separate processes, sharing the CPU cores or the one GPU "
                        "(small models leave a GPU mostly idle); logs in OUT/NAME/job-<k>.log")

    d = sub.add_parser("demo", help="every experiment's quick profile, then the report")
    d.add_argument("--out", default="results")
    d.add_argument("--only", action="append", default=[], help="run only these experiments")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--jobs", type=int, default=None, help="experiments run side by side (default: CPU cores)")

    rep = sub.add_parser("report", help="rebuild tables, plots, report.md and report.html from results")
    rep.add_argument("--out", default="results")
    rep.add_argument("--publish", default=None, metavar="DIR",
                     help="also copy each experiment's latest results into DIR/<experiment>/ (e.g. docs/results), "
                          "generate its tables there and refresh the generated blocks of README.md and docs/*.md")
    rep.add_argument("--only", action="append", default=[], help="publish only these experiments")
    rep.add_argument("--as", dest="alias", default=None, metavar="NAME",
                     help="publish the one --only experiment as DIR/NAME (e.g. a learning-curve run beside the "
                          "confirmatory one)")

    b = sub.add_parser("bench", help="time candidates against baselines measured in the same process")
    b.add_argument("name", nargs="?", default=None)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--publish", default=None, metavar="FILE",
                   help="merge the rows into FILE (e.g. docs/results/bench.json) with the machine, threads and date; "
                        "writes FILE's .md beside it and refreshes the generated bench blocks of the docs")
    return p


def _cmd_list() -> None:
    from .core.registry import benchmarks, experiments

    print("experiments (profiles with estimated CPU minutes on 2 cores; `transferlab show NAME` for options):")
    for name, e in experiments().items():
        est = e.cpu_minutes or {}
        profiles = "  ".join(f"{p}" + (f" ~{est[p]:g} min" if p in est else "") for p in sorted(e.profiles))
        print(f"  {name:28s} {e.description.splitlines()[0]}\n  {'':28s} profiles: {profiles}")
    print("benchmarks:")
    for name, b in benchmarks().items():
        print(f"  {name:28s} {b.description}")


def _cmd_show(name: str) -> None:
    import dataclasses

    from .core.config import config_help
    from .core.registry import get_experiment

    e = get_experiment(name)
    print(f"{e.name}: {e.description}\nreference arm: {e.reference}; metrics: {', '.join(e.metrics)}")
    for p in sorted(e.profiles):
        print(f"profile {p}: " + (", ".join(f"{k}={v}" for k, v in e.profiles[p].items()) or "defaults"))

    def walk(cls, prefix=""):
        for fname, text, default in config_help(cls):
            f = next(f for f in dataclasses.fields(cls) if f.name == fname)
            if dataclasses.is_dataclass(default):
                print(f"  {prefix}{fname}: {text}")
                walk(type(default), prefix + fname + ".")
            else:
                shown = default if default is not dataclasses.MISSING else f.default_factory()
                print(f"  {prefix}{fname} = {shown!r}\n      {text}")

    print("options (--set KEY=VALUE):")
    walk(e.config)


def _cmd_run(a) -> None:
    from .core.engine import Engine
    from .core.results import check_writable
    from .core.runner import report_run, run_experiment

    check_writable(Path(a.out))
    engine = Engine(device=a.device, mixed_precision=a.mixed_precision) if a.jobs == 1 else None
    if engine is None:
        out_dir = _run_jobs(a)
        engine = Engine(device="cpu", threads=1)  # the parent only writes the report
    else:
        out_dir = run_experiment(a.name, profile=a.profile, seeds=a.seeds, overrides=a.overrides, out=a.out,
                                 engine=engine)
    report_run(engine, a.out, out_dir, full_report=not a.no_report)


def _run_jobs(a) -> Path:
    """`run --jobs N`: N worker processes claim the unfinished (arm, seed) runs; then one report."""
    import json
    import os
    import shutil

    from .core.jobs import fresh_claim_dir, run_side_by_side
    from .core.registry import get_experiment
    from .core.report import write_experiment_report
    from .core.results import resolve_config

    if a.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {a.jobs}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--jobs runs its own processes; use it without `accelerate launch`, or drop --jobs")
    resolve_config(get_experiment(a.name), a.profile, a.overrides, a.seeds)  # typos fail before any process starts
    out_dir = Path(a.out) / a.name
    claims = fresh_claim_dir(out_dir)
    spec = json.dumps({"name": a.name, "profile": a.profile, "seeds": a.seeds, "overrides": a.overrides,
                       "out": a.out, "device": a.device, "mixed_precision": a.mixed_precision, "claims": str(claims)})
    try:
        results = run_side_by_side([(f"job {k}", [spec], out_dir / f"job-{k}.log") for k in range(a.jobs)], a.jobs,
                                   a.name, module="transferlab.core.worker")
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    failed = [label for label, rc, _ in results if rc != 0]
    if failed:
        raise UserError(f"{', '.join(failed)} failed; see {out_dir}/job-<k>.log, then rerun the same command to resume")
    write_experiment_report(out_dir)
    return out_dir


def _cmd_demo(a) -> None:
    from .core.demo import run_demo
    from .core.registry import experiments, get_experiment
    from .core.report import write_report
    from .core.results import check_writable

    out = Path(a.out)
    check_writable(out)
    names = a.only or list(experiments())
    for n in names:
        get_experiment(n)  # fail fast on a typo before running anything
    t0 = time.perf_counter()
    run_demo(names, out, jobs=a.jobs, device=a.device)
    md, html = write_report(out)
    print(md.read_text())
    print(f"[demo] all done in {time.perf_counter() - t0:.0f}s\nreport: {md}\n        {html}")


def _cmd_bench(a) -> None:
    from .core.bench import format_comparisons
    from .core.engine import Engine
    from .core.registry import benchmarks, get_benchmark

    engine = Engine(device=a.device)
    names = [a.name] if a.name else list(benchmarks())
    rows, by_name = [], {}
    for n in names:
        b = get_benchmark(n)
        print(f"[bench] {n} on {engine.device} ({engine.threads} threads) ...", flush=True)
        by_name[n] = b.fn(str(engine.device))
        rows += by_name[n]
    print(format_comparisons(rows))
    if a.publish:
        from .core.publish import machine_info, publish_bench

        path = publish_bench(a.publish, by_name, machine_info(a.device, engine.threads))
        print(f"published: {path} and {path.with_suffix('.md')}")
    if a.json:
        from .core.io import atomic_write_json

        atomic_write_json(a.json, [r.to_dict() for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "list":
            _cmd_list()
        elif args.cmd == "show":
            _cmd_show(args.name)
        elif args.cmd == "run":
            _cmd_run(args)
        elif args.cmd == "demo":
            _cmd_demo(args)
        elif args.cmd == "report":
            from .core.report import write_report

            if args.publish:
                from .core.publish import publish

                done = publish(args.out, args.publish, names=args.only or None, alias=args.alias)
                print(f"published {', '.join(done) or 'nothing'} under {args.publish}")
            md, html = write_report(args.out)
            print(f"report: {md}\n        {html}")
        elif args.cmd == "bench":
            _cmd_bench(args)
    except UserError as e:
        print(f"transferlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferlab: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
