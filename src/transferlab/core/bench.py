"""Timing harness: warm-up, median of repeats, CUDA synchronisation, ratio against a baseline.

Benchmarks return `Comparison`s: a candidate and its baseline timed in the same process, so the
ratio is meaningful on noisy machines where absolute times are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7, min_time: float = 0.0,
            device: str | torch.device = "cpu", clock: str = "wall") -> float:
    """Median seconds of `fn()`; synchronises CUDA around each call.

    `clock="auto"` reads the process's CPU time instead of wall time on a one-thread CPU run. Why: on a
    shared machine wall time also counts the neighbours' time slices (ratios swung 1.6x-3.2x between runs),
    while a single-threaded process's CPU time is the work it did. Multi-threaded and CUDA runs use wall time.
    """
    cuda = torch.device(device).type == "cuda"
    cpu_clock = clock == "cpu" or (clock == "auto" and not cuda and torch.get_num_threads() == 1)
    now = time.process_time if cpu_clock else time.perf_counter

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return now() - t0

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeat)]
    while sum(times) < min_time:
        times.append(once())
    return statistics.median(times)


def time_pair(candidate: Callable, baseline: Callable, *, rounds: int = 3, **kw) -> tuple[float, float]:
    """Time candidate and baseline interleaved (A B A B ...) so drift hits both equally."""
    c, b = [], []
    for _ in range(rounds):
        c.append(time_fn(candidate, **kw))
        b.append(time_fn(baseline, **kw))
    return statistics.median(c), statistics.median(b)


@dataclass
class Comparison:
    """One benchmark line.

    `value` and `reference` are seconds unless `unit` says otherwise. `target` is read by `mode`:
    - "speedup": reference / value must be >= target (candidate faster than baseline);
    - "ratio": value / reference must be <= target (candidate at most `target` x baseline);
    - "quality": value / reference must be >= target (e.g. clustering objective, higher is better);
    - "max": value must be <= target (an absolute limit, e.g. seconds).
    """

    name: str
    candidate: str
    baseline: str
    value: float
    reference: float | None = None
    target: float | None = None
    mode: str = "ratio"
    unit: str = "s"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.reference / self.value if self.mode == "speedup" else self.value / self.reference

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.mode == "max":
            return self.value <= self.target
        r = self.ratio
        if r is None:
            return None
        return r <= self.target if self.mode == "ratio" else r >= self.target

    def to_dict(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio, "passed": self.passed}


def format_comparisons(rows: list[Comparison]) -> str:
    def num(x, unit):
        if x is None:
            return "–"
        return f"{x * 1e3:.3f} ms" if unit == "s" else f"{x:.4g}{(' ' + unit) if unit else ''}"

    head = "| benchmark | candidate | value | baseline | value | ratio | target | ok |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sym = {"speedup": "≥", "ratio": "≤", "quality": "≥", "max": "≤"}[r.mode]
        tgt = "–" if r.target is None else f"{sym} {r.target:g}" + ("" if r.mode != "max" else f" {r.unit}")
        ok = {True: "yes", False: "NO", None: "–"}[r.passed]
        ratio = "–" if r.ratio is None else (f"{r.ratio:.2f}×" if r.mode == "speedup" else f"{r.ratio:.3f}")
        lines.append(f"| {r.name} | {r.candidate} | {num(r.value, r.unit)} | {r.baseline} | "
                     f"{num(r.reference, r.unit)} | {ratio} | {tgt} | {ok} |")
    return "\n".join(lines)
