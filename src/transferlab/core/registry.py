"""Named experiments and benchmarks.

An experiment is a function `(config, arm, seed, engine) -> dict of metrics`, called once per arm
and seed, plus a frozen config dataclass that has at least the fields `arms` and `seeds`.
Profiles ("quick" for the demo, "full" for the paper-scale run) are dicts of config overrides.

    @register_experiment("fmnist-transfer", config=FmnistTransferConfig, reference="finetune",
                         metrics=("test_acc",), description="...", profiles={"quick": {...}, "full": {...}})
    def fmnist_transfer(cfg, arm, seed, engine): ...

A benchmark is a function `(device: str) -> list[Comparison]`; see `core.bench`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

# Registration is by discovery: every module named `experiments*` or `bench*` in a subpackage of
# transferlab (and every module of `transferlab.examples`) registers what it defines when imported.
# A new method folder needs no edit here.
_REGISTERING_PREFIXES = ("experiments", "bench")
_NOT_METHODS = {"core", "data", "nn"}


def registering_modules() -> list[str]:
    """Dotted names of the modules that register experiments and benchmarks, in a stable order."""
    import pkgutil

    import transferlab

    names = []
    for pkg in sorted(pkgutil.iter_modules(transferlab.__path__), key=lambda m: m.name):
        if not pkg.ispkg or pkg.name in _NOT_METHODS:
            continue
        sub = importlib.import_module(f"transferlab.{pkg.name}")
        for mod in sorted(pkgutil.iter_modules(sub.__path__), key=lambda m: m.name):
            if pkg.name == "examples" or mod.name.startswith(_REGISTERING_PREFIXES):
                names.append(f"transferlab.{pkg.name}.{mod.name}")
    return names


@dataclass
class Figures:
    """What an experiment's plot hook made: the PNG files it wrote and Markdown notes for the report."""

    paths: list = dataclasses.field(default_factory=list)
    notes: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    fn: Callable
    config: type
    reference: str
    metrics: tuple[str, ...]
    description: str
    profiles: dict
    plot: Callable | None = None  # (rows, cfg dataclass, out_dir) -> Figures
    method: str | None = None  # the arm that is the method under test (default: first non-reference arm)
    headline: tuple[str, ...] = ()  # metrics of the main table (default: the first three of `metrics`)
    cpu_minutes: dict | None = None  # estimated single-machine CPU minutes per profile, for `transferlab list`
    lower_is_better: tuple[str, ...] | None = None  # metrics where smaller is better (default: by name)
    extra_arms: tuple[str, ...] = ()  # arms that exist but are not run by default (`--set arms=...` adds them)
    primary: str | None = None  # the metric the paper's claim is about (default: the first of `metrics`)
    baseline: str | None = None  # the arm the summary compares the method to (default: the reference arm)

    @property
    def known_arms(self) -> tuple[str, ...]:
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}["arms"]
        return tuple(defaults) + tuple(a for a in self.extra_arms if a not in defaults)

    def higher_is_better(self, metric: str) -> bool:
        if self.lower_is_better is not None:
            return metric not in self.lower_is_better
        return not any(w in metric.lower() for w in ("fid", "loss", "mse", "forgetting", "error", "_s"))

    @property
    def primary_metric(self) -> str:
        return self.primary or self.metrics[0]

    @property
    def headline_metrics(self) -> tuple[str, ...]:
        return self.headline or self.metrics[:3]

    def method_arm(self, arms) -> str | None:
        if self.method is not None and self.method in arms:
            return self.method
        return next((a for a in arms if a != self.reference), None)

    def make_config(self, profile: str = "quick", overrides: list[str] | dict | None = None):
        """The profile's config with the user's overrides on top, applied and validated in one step."""
        if profile not in self.profiles:
            raise UserError(f"experiment {self.name!r} has no profile {profile!r}; choose from {sorted(self.profiles)}")
        from .config import apply_overrides, parse_overrides

        merged = dict(self.profiles[profile])
        merged.update(parse_overrides(overrides or {}))
        return apply_overrides(self.config(), merged)


@dataclass(frozen=True)
class Benchmark:
    name: str
    fn: Callable
    description: str


_EXPERIMENTS: dict[str, Experiment] = {}
_BENCHMARKS: dict[str, Benchmark] = {}
_loaded = False


def register_experiment(name, *, config, reference, metrics, description, profiles, plot=None, method=None,
                        headline=(), cpu_minutes=None, lower_is_better=None, extra_arms=(), primary=None,
                        baseline=None):
    names = {f.name for f in dataclasses.fields(config)}
    missing = {"arms", "seeds"} - names
    if missing:
        raise TypeError(f"experiment config {config.__name__} needs fields {sorted(missing)}")
    if "quick" not in profiles or "full" not in profiles:
        raise TypeError(f"experiment {name!r} must define 'quick' and 'full' profiles")

    if primary is not None and primary not in metrics:
        raise TypeError(f"experiment {name!r}: primary metric {primary!r} is not one of its metrics {metrics}")

    def deco(fn):
        if name in _EXPERIMENTS and _EXPERIMENTS[name].fn.__qualname__ != fn.__qualname__:
            raise TypeError(f"experiment name {name!r} is registered twice")
        _EXPERIMENTS[name] = Experiment(name, fn, config, reference, tuple(metrics), description, profiles, plot,
                                        method, tuple(headline), cpu_minutes,
                                        None if lower_is_better is None else tuple(lower_is_better),
                                        tuple(extra_arms), primary, baseline)
        return fn

    return deco


def register_benchmark(name: str, description: str):
    def deco(fn):
        _BENCHMARKS[name] = Benchmark(name, fn, description)
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in registering_modules():
        importlib.import_module(mod)
    _loaded = True


def experiments() -> dict[str, Experiment]:
    _load_all()
    return dict(sorted(_EXPERIMENTS.items()))


def benchmarks() -> dict[str, Benchmark]:
    _load_all()
    return dict(sorted(_BENCHMARKS.items()))


def get_experiment(name: str) -> Experiment:
    exps = experiments()
    if name not in exps:
        raise UserError(f"unknown experiment {name!r}; `transferlab list` shows: {', '.join(exps)}")
    return exps[name]


def get_benchmark(name: str) -> Benchmark:
    bs = benchmarks()
    if name not in bs:
        raise UserError(f"unknown benchmark {name!r}; `transferlab list` shows: {', '.join(bs)}")
    return bs[name]
