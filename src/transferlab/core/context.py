"""The run context: what the runner hands an experiment for one (arm, seed).

An experiment is written as its protocol and nothing else. Everything that depends on where a run
lives, how many processes share it, or what has already been computed goes through the context:

    def my_experiment(cfg, arm, seed, ctx):
        teacher = ctx.shared("teacher", lambda: train_teacher(cfg, seed))     # once per (config, seed)
        feats = ctx.stage("features", lambda: extract(teacher))               # resumes after a kill
        lr, model = ctx.choose_on_validation("lr", cfg.lrs, fit=lambda lr: train(lr), score=val_acc)
        return {"test_acc": test_acc(model)}

The context also forwards the engine's API (`ctx.device`, `ctx.prepare`, `ctx.progress`,
`ctx.save_checkpoint`, ...), so code written against the engine keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, rng_state, set_rng_state
from .errors import UserError
from .io import atomic_torch_save

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: --jobs workers then rely on the atomic rename alone
    fcntl = None


def _key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


class RunContext:
    """One (arm, seed) of an experiment: shared artifacts, resumable stages, validation choices.

    Args:
        engine: the process's engine (devices, processes, checkpoints).
        exp_dir: the experiment's results folder; shared artifacts live under `exp_dir/shared/`.
        config_hash: hash of the config without arms and seeds (see `core.config.config_hash`).
        arm, seed: the run.
        run_dir: this run's private folder (checkpoints, stages).
    """

    def __init__(self, engine: Engine, exp_dir: Path | None, config_hash: str, arm: str, seed: int,
                 run_dir: Path | None):
        self.engine = engine
        self.exp_dir = None if exp_dir is None else Path(exp_dir)
        self.config_hash = config_hash
        self.arm = arm
        self.seed = seed
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.choices: dict[str, dict] = {}

    def __getattr__(self, name: str):
        # Only called for names not defined here: the engine's device, prepare, progress, print0, ...
        return getattr(self.engine, name)

    # ---- artifacts shared by the arms (and, if asked, the seeds) of one config ------------------
    def shared(self, name: str, build: Callable[[], Any], *, per_seed: bool = True, key: Any = None,
               collective: bool = False, scope: str | None = None) -> Any:
        """`build()` computed once and reused by every arm of this config (and seed, if `per_seed`).

        `key`, when given, replaces the config hash: pass the config fields the artifact depends on,
        so that runs differing only in other fields share it too. `scope` shares it across the
        experiments that pass the same scope (under `<out>/shared/<scope>/`), for example two
        experiments that transfer from the same pre-trained model; it needs a `key`. The artifact must be loadable with
        `torch.load(weights_only=True)` (tensors, state dicts, lists, dicts, numbers, strings).

        Across the workers of `run --jobs N` an exclusive file lock makes one worker build while the
        others wait and load. Across the ranks of one distributed run the main process builds and
        the others wait at a barrier; with `collective` every rank runs `build` together (it trains
        data-parallel, with collectives inside) and the main process saves the result. The file is
        written atomically, so a killed build leaves nothing behind and the next run builds again.
        """
        if self.exp_dir is None:
            return build()
        if scope is not None and key is None:
            raise UserError(f"shared({name!r}, scope={scope!r}) needs a key: the fields the artifact depends on")
        tag = self.config_hash if key is None else _key_hash(key)
        root = self.exp_dir / "shared" if scope is None else self.exp_dir.parent / "shared" / scope
        path = root / tag / (f"{name}-seed{self.seed}.pt" if per_seed else f"{name}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.engine.num_processes > 1:
            exists = path.exists()
            self.engine.wait()  # every rank has looked before the main process may write
            if not exists and (collective or self.engine.is_main):
                value = build()
                if self.engine.is_main:
                    atomic_torch_save(value, path)
            self.engine.wait()
            return torch.load(path, map_location="cpu", weights_only=True)
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if path.exists():
                return torch.load(path, map_location="cpu", weights_only=True)
            value = build()
            atomic_torch_save(value, path)
            return value
        finally:
            os.close(fd)  # closing releases the lock

    # ---- resumable stages of this run ----------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn()` run once per (arm, seed); a killed run that restarts gets the saved value back.

        The random-number state after the stage is saved with its value and restored on resume, so
        a resumed run continues exactly as the uninterrupted one would have (bitwise on CPU).
        """
        if self.run_dir is None:
            return fn()
        path = self.run_dir / "stages" / f"{name}.pt"
        if path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=False)
            set_rng_state(blob["rng"])
            return blob["value"]
        value = fn()
        if self.engine.is_main:
            atomic_torch_save({"value": value, "rng": rng_state()}, path)
        self.engine.wait()
        return value

    def finish(self) -> None:
        """Called by the runner once the run's metrics are saved: stages are no longer needed."""
        if self.run_dir is not None and self.engine.is_main:
            shutil.rmtree(self.run_dir / "stages", ignore_errors=True)

    # ---- the one way to pick a hyperparameter --------------------------------------------------
    def choose_on_validation(self, name: str, candidates: Sequence[Any], fit: Callable[[Any], Any],
                             score: Callable[[Any], float], *, higher_is_better: bool = True) -> tuple[Any, Any]:
        """Fit each candidate, score it on validation data, keep the best: returns (candidate, fitted).

        The candidates and their validation scores are recorded in this run's results line (under
        "choices"), so a table can say what was chosen and from what. Ties keep the earlier
        candidate. Only the best fitted object is kept in memory.
        """
        candidates = list(candidates)
        if not candidates:
            raise UserError(f"choose_on_validation({name!r}): no candidates; give at least one value")
        best = None
        scores = []
        for c in candidates:
            fitted = fit(c)
            s = float(score(fitted))
            scores.append(s)
            better = best is None or (s > best[0] if higher_is_better else s < best[0])
            if better:
                best = (s, c, fitted)
            del fitted
        self.choices[name] = {"candidates": [_plain(c) for c in candidates], "scores": scores,
                              "chosen": _plain(best[1]), "higher_is_better": higher_is_better}
        return best[1], best[2]

    def record_choice(self, name: str, candidates: Sequence[Any], scores: Sequence[float], chosen: Any) -> None:
        """Record a choice made elsewhere (for example one lr per arm chosen by the seed mean)."""
        self.choices[name] = {"candidates": [_plain(c) for c in candidates], "scores": [float(s) for s in scores],
                              "chosen": _plain(chosen)}


def _plain(v: Any) -> Any:
    """A JSON-friendly form of a candidate value."""
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)
