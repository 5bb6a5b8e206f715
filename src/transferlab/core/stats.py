"""Summary statistics over seeds: mean, 95% confidence interval, paired differences."""

from __future__ import annotations

import math

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30; beyond that we use 1.96.
# Tabulated so the core needs no scipy.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]


def t_critical(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n). The half-width is nan for n < 2."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, t_critical(n - 1) * math.sqrt(var / n), n


def paired_diff(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% CI of a[seed] - b[seed] over the seeds both have (dicts keyed by seed)."""
    common = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in common])


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
