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

# Modules that register experiments/benchmarks when imported. A method folder that is not
# present yet is skipped, so the registry never depends on every method being installed.
EXPERIMENT_MODULES = (
    "transferlab.examples.fmnist_transfer",
    "transferlab.emoe.experiments",
    "transferlab.emoe.bench",
    "transferlab.emoe.bench_layer",
    "transferlab.cuber.experiments",
    "transferlab.cuber.bench",
    "transferlab.metadmoe.experiments",
    "transferlab.metadmoe.bench",
    "transferlab.kind.experiments",
    "transferlab.kind.bench",
    "transferlab.cprd.experiments",
    "transferlab.cprd.bench",
)


@dataclass(frozen=True)
class Experiment:
    name: str
    fn: Callable
    config: type
    reference: str
    metrics: tuple[str, ...]
    description: str
    profiles: dict
    plot: Callable | None = None  # (rows, cfg, out_dir) -> list of PNG paths

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

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


def register_experiment(name, *, config, reference, metrics, description, profiles, plot=None):
    names = {f.name for f in dataclasses.fields(config)}
    missing = {"arms", "seeds"} - names
    if missing:
        raise TypeError(f"experiment config {config.__name__} needs fields {sorted(missing)}")
    if "quick" not in profiles or "full" not in profiles:
        raise TypeError(f"experiment {name!r} must define 'quick' and 'full' profiles")

    def deco(fn):
        if name in _EXPERIMENTS and _EXPERIMENTS[name].fn.__qualname__ != fn.__qualname__:
            raise TypeError(f"experiment name {name!r} is registered twice")
        _EXPERIMENTS[name] = Experiment(name, fn, config, reference, tuple(metrics), description, profiles, plot)
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
    for mod in EXPERIMENT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only skip when the module itself is absent, not when it fails to import a dependency.
            if e.name is None or not mod.startswith(e.name):
                raise
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
