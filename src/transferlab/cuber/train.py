"""A minimal continual-learning loop over a task stream, filling the accuracy matrix R.

R[i][j] = test accuracy on task j after training task i (every row complete, so forward transfer
can be read above the diagonal); b[j] = accuracy of the untrained model. State (model, strategy,
rows so far) is checkpointed after every task, so a killed run resumes with identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import batches
from .strategies import Strategy


@torch.no_grad()
def evaluate(model: nn.Module, strategy: Strategy, task, task_id: int, batch_size: int = 1000,
             split: str = "test") -> float:
    was = model.training
    model.eval()
    strategy.use_task(task_id)
    dev = strategy.device
    correct = total = 0
    for x, y in task.loader(batch_size, None, split):
        pred = strategy.forward(model, x.to(dev), task_id).argmax(-1)
        correct += (pred == y.to(dev)).sum().item()
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


class _CachedBatches:
    """The batches a TaskLoader with the same seed yields, each announcing its projected rows first."""

    def __init__(self, X, XP, y, strategy, batch_size, seed):
        self.X, self.XP, self.y, self.strategy, self.batch_size, self.seed = X, XP, y, strategy, batch_size, seed

    def __len__(self):
        return -(-len(self.X) // self.batch_size)

    def __iter__(self):
        for b in batches(len(self.X), self.batch_size, seed=self.seed):
            self.strategy.feed_projected(self.XP.index_select(0, b))
            yield self.X.index_select(0, b), self.y[b]


@torch.no_grad()
def val_loss(model: nn.Module, strategy: Strategy, task, task_id: int, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    strategy.use_task(task_id)
    dev = strategy.device
    total, n = 0.0, 0
    for x, y in task.loader(batch_size, None, "val"):
        total += F.cross_entropy(strategy.forward(model, x.to(dev), task_id), y.to(dev), reduction="sum").item()
        n += len(y)
    model.train(was)
    return total / max(n, 1)


def train_task(model: nn.Module, strategy: Strategy, task, task_id: int, *, lr: float, epochs: int,
               batch_size: int, seed: int, engine=None, patience: int = 0, lr_factor: float = 2.0,
               lr_min: float = 1e-5, restore_best: bool = True) -> int:
    """SGD with a fresh optimiser per task (GPM/TRGP protocol), calling the strategy's hooks.

    patience = 0: a fixed budget of `epochs`. patience > 0: GPM's CIFAR schedule, up to `epochs`
    epochs; after `patience` epochs without a lower validation loss the lr is divided by
    `lr_factor`, training stops once it falls below `lr_min`, and with `restore_best` the weights
    (and the strategy's extra parameters) of the best-validation epoch are restored. Returns the
    number of epochs run.
    """
    strategy.before_task(task_id, task.loader(batch_size, seed))
    extra = strategy.extra_parameters()
    params = [p for p in model.parameters() if p.requires_grad] + extra
    opt = torch.optim.SGD(params, lr=lr)
    dev = strategy.device
    model.train()
    best, best_state, wait, cur = float("inf"), None, patience, lr
    ran = 0
    cache = getattr(getattr(strategy, "cfg", None), "input_cache", False)
    if cache:  # GPM's first-layer projection done once for the task's whole training set
        X = task.transform(task.x_train)
        XP = strategy.project_inputs(X)
    for epoch in range(epochs):
        loader = task.loader(batch_size, seed * 7919 + task_id * 101 + epoch)
        if cache:
            loader = _CachedBatches(X, XP, task.y_train, strategy, batch_size, loader.seed)
        it = engine.progress(loader, desc=f"task {task_id} epoch {epoch + 1}/{epochs}") if engine else loader
        for x, y in it:
            loss = F.cross_entropy(strategy.forward(model, x.to(dev), task_id), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            strategy.after_backward(model)
            opt.step()
        ran = epoch + 1
        if patience <= 0:
            continue
        v = val_loss(model, strategy, task, task_id)
        if v < best:
            best, wait = v, patience
            if restore_best:
                best_state = ({k: t.detach().clone() for k, t in model.state_dict().items()},
                              [q.detach().clone() for q in extra])
        else:
            wait -= 1
            if wait <= 0:
                cur /= lr_factor
                if cur < lr_min:
                    break
                wait = patience
                for group in opt.param_groups:
                    group["lr"] = cur
    if best_state is not None:
        model.load_state_dict(best_state[0])
        with torch.no_grad():
            for q, saved in zip(extra, best_state[1]):
                q.copy_(saved)
    strategy.after_task(task_id, task.loader(batch_size, seed * 7919 + task_id * 101 + 99))
    return ran


def run_stream(model: nn.Module, strategy: Strategy, tasks, *, lr: float, epochs: int, batch_size: int,
               seed: int, engine=None, split: str = "test", **schedule) -> dict:
    """Train on every task in order; returns {"R": T x T list, "b": list} (accuracies in %, on `split`)."""
    T = len(tasks)
    state = engine.load_checkpoint() if engine is not None else None
    if state is not None and state.get("phase") == "stream":
        model.load_state_dict(state["model"])
        strategy.load_state_dict(state["strategy"])
        R, b = state["R"], state["b"]
    else:
        b = [evaluate(model, strategy, tasks[j], j, split=split) for j in range(T)]
        R = []
    for t in range(len(R), T):
        train_task(model, strategy, tasks[t], t, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                   engine=engine, **schedule)
        R.append([evaluate(model, strategy, tasks[j], j, split=split) for j in range(T)])
        if engine is not None:
            engine.save_checkpoint({"phase": "stream", "model": model.state_dict(),
                                    "strategy": strategy.state_dict(), "R": R, "b": b})
    return {"R": R, "b": b}


def run_multitask(model: nn.Module, tasks, *, lr: float, epochs: int, batch_size: int, seed: int,
                  forward=None, engine=None, split: str = "test") -> dict:
    """Joint training on all tasks at once (upper bound): every batch mixes tasks; one final R row.

    Each step draws one batch from every task and sums the per-task batch losses, so each task gets
    the same per-sample step size as in sequential training and multi-head models see every head.
    """
    strategy = Strategy(model, forward)
    T = len(tasks)
    b = [evaluate(model, strategy, tasks[j], j, split=split) for j in range(T)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dev = strategy.device
    start = 0
    state = engine.load_checkpoint() if engine is not None else None
    if state is not None and state.get("phase") == "multitask":
        model.load_state_dict(state["model"])
        start = state["epoch"]
    model.train()
    for epoch in range(start, epochs):
        loaders = [iter(t.loader(batch_size, seed * 7919 + j * 101 + epoch)) for j, t in enumerate(tasks)]
        steps = min(len(t.loader(batch_size, None)) for t in tasks)
        rng = range(steps)
        for _ in engine.progress(rng, desc=f"multitask epoch {epoch + 1}/{epochs}") if engine else rng:
            loss = 0.0
            for j, it in enumerate(loaders):
                x, y = next(it)
                loss = loss + F.cross_entropy(strategy.forward(model, x.to(dev), j), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if engine is not None:  # plain SGD has no optimiser state: the model is the whole state
            engine.save_checkpoint({"phase": "multitask", "epoch": epoch + 1, "model": model.state_dict()})
    row = [evaluate(model, strategy, tasks[j], j, split=split) for j in range(T)]
    return {"R": [row], "b": b}
