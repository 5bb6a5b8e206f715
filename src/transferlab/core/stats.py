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


# One-sided t_{0.80, df} for df = 1..30 (80% power); beyond that the normal 0.8416.
_T80 = [
    1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879,
    0.876, 0.873, 0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860,
    0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854,
]


def t_critical(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def minimal_detectable_effect(diffs) -> float:
    """The smallest true mean paired difference that n seeds detect with 80% power at two-sided 5%.

    (t_{0.975, n-1} + t_{0.80, n-1}) * sd / sqrt(n), from the measured spread of the paired
    differences: a run whose MDE exceeds the paper's effect could not have seen that effect.
    """
    xs = [float(x) for x in diffs if x is not None and not math.isnan(float(x))]
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t80 = _T80[n - 2] if n - 1 <= len(_T80) else 0.8416
    return (t_critical(n - 1) + t80) * sd / math.sqrt(n)


def verdict(mean: float, half: float, mde: float, higher_is_better: bool = True) -> str:
    """Words for a paired difference: a CI that excludes 0 is a finding; otherwise say what could be seen."""
    if math.isnan(half):
        return "too few seeds"
    if mean - half > 0 or mean + half < 0:
        return "better" if (mean > 0) == higher_is_better else "worse"
    return f"no difference detected (MDE {mde:.2g})"


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
    return mean_ci(paired_values(a, b))


def paired_values(a: dict, b: dict) -> list[float]:
    """a[seed] - b[seed] for the seeds both have, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
