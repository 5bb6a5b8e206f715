"""Continual-learning strategies with one small hook interface any training loop can call.

    strategy.before_task(task_id, loader)   # build projectors / regime tests, once per task
    strategy.use_task(task_id)               # select task-specific state (TRGP's Q) for train/eval
    ... per batch: loss.backward(); strategy.after_backward(model); optimizer.step()
    strategy.after_task(task_id, loader)     # update memories from the task's data

`loader` is any re-iterable of (x, y) batches of the task's training data (a shuffled order gives
GPM's random representation subset). Optimise `model.parameters()` plus
`strategy.extra_parameters()` (TRGP's scaling matrices) with a fresh optimiser per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .config import EWCConfig, GPMConfig
from .layer import LayerPatch
from .memory import GradientProjectionMemory

# fan-in up to which `GPMConfig.input_cache` projects a layer with one dense m x m complement projector
DENSE_PROJECTOR_MAX = 256

Forward = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


def default_forward(model: nn.Module, x: torch.Tensor, task_id: int) -> torch.Tensor:
    return model(x)


def take_samples(loader: Iterable, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples of a loader (raises a clear error when it yields none)."""
    xs, ys, got = [], [], 0
    for x, y in loader:
        xs.append(x[: n - got])
        ys.append(y[: n - got])
        got += len(xs[-1])
        if got >= n:
            break
    if got == 0:
        raise UserError("the task loader yielded no samples; pass the task's training batches as (x, y) pairs")
    return torch.cat(xs), torch.cat(ys)


def check_loader(loader) -> None:
    if loader is None:
        raise UserError("a task loader is required: an iterable of (x, y) training batches")
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise UserError("the task loader is empty; each task needs training samples")


class Strategy:
    """Plain fine-tuning; the base of every strategy (all hooks are no-ops)."""

    name = "finetune"

    def __init__(self, model: nn.Module, forward: Forward | None = None):
        self.model = model
        self.forward = forward or default_forward
        self.task_id = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def before_task(self, task_id: int, loader: Iterable) -> None:
        check_loader(loader)
        self.task_id = task_id

    def use_task(self, task_id: int) -> None:
        pass

    def after_backward(self, model: nn.Module | None = None) -> None:
        pass

    def after_task(self, task_id: int, loader: Iterable) -> None:
        check_loader(loader)

    def extra_parameters(self) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> dict:
        return {"task_id": self.task_id}

    def load_state_dict(self, state: dict) -> None:
        self.task_id = state["task_id"]

    def loss(self, x: torch.Tensor, y: torch.Tensor, task_id: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(self.model, x.to(self.device), task_id), y.to(self.device))


class Finetune(Strategy):
    """Lower bound: train each task with plain SGD, nothing protects old tasks."""


class EWC(Strategy):
    """Diagonal-Fisher penalty; its gradient lambda * sum_j F_j (theta - theta_j) is added in after_backward."""

    name = "ewc"

    def __init__(self, model: nn.Module, config: EWCConfig | None = None, forward: Forward | None = None):
        super().__init__(model, forward)
        self.cfg = config or EWCConfig()
        self.params = {n: p for n, p in model.named_parameters() if not any(e in n for e in self.cfg.exclude)}
        self.anchors: list[tuple[dict, dict]] = []  # (fisher, theta*) per finished task

    def after_backward(self, model=None) -> None:
        if not self.anchors or self.cfg.lam == 0:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is None:
                    continue
                for fisher, theta in self.anchors:
                    p.grad.add_(self.cfg.lam * fisher[n] * (p - theta[n]))

    def after_task(self, task_id: int, loader) -> None:
        check_loader(loader)
        x, y = take_samples(loader, self.cfg.fisher_samples)
        fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        was = self.model.training
        self.model.eval()
        for i in range(len(x)):  # per-sample squared gradients: the empirical diagonal Fisher
            self.model.zero_grad(set_to_none=True)
            self.loss(x[i: i + 1], y[i: i + 1], task_id).backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / len(x)
        self.model.zero_grad(set_to_none=True)
        self.model.train(was)
        theta = {n: p.detach().clone() for n, p in self.params.items()}
        self.anchors.append((fisher, theta))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "anchors": self.anchors}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.anchors = state["anchors"]


class GPM(Strategy):
    """Gradient Projection Memory: new-task gradients are projected off old tasks' input spans."""

    name = "gpm"

    def __init__(self, model: nn.Module, config: GPMConfig | None = None, forward: Forward | None = None,
                 layers: list[str] | None = None):
        super().__init__(model, forward)
        self.cfg = cfg = config or GPMConfig()
        probe = GradientProjectionMemory(model, layers, 0.5, 1, cfg.solver, cfg.exclude)
        n = len(probe.names)
        self.memory = GradientProjectionMemory(model, probe.names, cfg.threshold_fn(n), cfg.samples(n),
                                               cfg.solver, cfg.exclude)
        self.patches = {name: LayerPatch(mod) for name, mod in self.memory.modules.items()}
        self.shared_1d = [p for name, p in model.named_parameters()
                          if p.dim() == 1 and not any(e in name for e in cfg.exclude)]
        self.fast: set[str] = set()
        if cfg.input_cache:  # the speed recipe: small layers' projections cost dispatch, not flops
            self.memory.dense_max = DENSE_PROJECTOR_MAX

    def detach(self) -> None:
        """Restore the layers' original forward methods."""
        for p in self.patches.values():
            p.detach()

    def _fast_ok(self, name: str) -> bool:
        mod = self.memory.modules[name]
        dense = self.memory.factor(name)[0] == "dense"  # projected on the weight gradient, in one matmul
        return self.cfg.input_projection and not dense and isinstance(mod, nn.Linear) and mod.bias is None

    def _set_projection(self, exclude: set[str] = frozenset()) -> None:
        self.fast = set()
        for name, patch in self.patches.items():
            f = self.memory.factor(name)
            if f is not None and name not in exclude and self._fast_ok(name):
                patch.factor = f
                self.fast.add(name)
            else:
                patch.factor = None

    def before_task(self, task_id: int, loader) -> None:
        super().before_task(task_id, loader)
        self._set_projection()

    @property
    def first_layer(self) -> str:
        return self.memory.names[0]

    @torch.no_grad()
    def project_inputs(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """x projected off the first protected layer's basis, x (I - M M^T), for a whole training set.

        Call once per task after `before_task` (the basis is fixed within a task) and hand each
        batch's rows to `feed_projected` before its forward: the first layer's projected weight
        gradient then costs what a plain one does. Rows are (N, in_features) raw model inputs.
        """
        name = self.first_layer
        mod = self.memory.modules[name]
        if not isinstance(mod, nn.Linear) or mod.bias is not None:
            raise UserError(f"project_inputs needs a bias-free nn.Linear as the first protected layer; "
                            f"{name!r} is {type(mod).__name__}")
        x = x.reshape(len(x), -1).to(self.device, torch.float32)
        if x.shape[1] != mod.in_features:
            raise UserError(f"project_inputs got rows of {x.shape[1]} features; layer {name!r} takes "
                            f"{mod.in_features} (pass the flattened model inputs)")
        f = self.memory.factor(name)
        if f is None:
            return x.clone()
        mode, B = f
        out = torch.empty_like(x)
        for i in range(0, len(x), chunk):
            xb = x[i: i + chunk]
            if mode == "dense":
                out[i: i + chunk] = xb @ B
            else:
                p = (xb @ B) @ B.T
                out[i: i + chunk] = xb - p if mode == "sub" else p
        return out

    def feed_projected(self, xp: torch.Tensor) -> None:
        """The projected rows (from `project_inputs`) of the batch whose forward comes next."""
        self.patches[self.first_layer].cached = xp

    def after_backward(self, model=None) -> None:
        todo = []
        for n in self.memory.names:  # layers whose every forward projected inside backward are done
            p = self.patches[n]
            if p.unprojected:
                todo.append(n)
            p.unprojected = False
        self.memory.project_(todo)
        if self.task_id > 0 and self.cfg.freeze_bn_after_first:
            for p in self.shared_1d:
                if p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def representations(self, task_id: int, loader) -> dict[str, torch.Tensor]:
        was = self.model.training
        self.model.eval()
        self.use_task(task_id)
        dev = self.device
        try:
            return self.memory.collect(lambda x: self.forward(self.model, x.to(dev), task_id), loader,
                                       self.cfg.rep_batch)
        finally:
            self.model.train(was)

    def after_task(self, task_id: int, loader) -> None:
        check_loader(loader)
        for p in self.patches.values():
            p.factor = None  # representations see the plain layers
        self.memory.update(self.representations(task_id, loader), task_id)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
