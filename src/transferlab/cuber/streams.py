"""Task streams on real Fashion-MNIST: permuted (GPM's PMNIST protocol), split and rotated.

A `Task` holds uint8 images (shared with other tasks, not copied) and a `transform` that turns a
batch into the model's input, so ten permuted 60k-image tasks cost one copy of the data.
`TaskLoader` is a re-iterable of (x, y) batches in a seeded order (a pure function of seed and
epoch), which is what the strategies' hooks take.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..data import load_fashion_mnist
from ..data.image_ops import per_class_indices, rotate
from ..nn import batches


@dataclass
class Task:
    id: int
    name: str
    x_train: torch.Tensor  # uint8 (N, 28, 28)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor]
    n_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def loader(self, batch_size: int, seed: int | None, split: str = "train") -> TaskLoader:
        x, y = {"train": (self.x_train, self.y_train), "test": (self.x_test, self.y_test),
                "val": (self.x_val, self.y_val)}[split]
        if x is None:
            raise UserError(f"task {self.name} has no {split} split")
        return TaskLoader(x, y, self.transform, batch_size, seed)


class TaskLoader:
    """Batches (transform(x[b]), y[b]); shuffled by `seed` (None = in order)."""

    def __init__(self, x, y, transform, batch_size: int, seed: int | None):
        self.x, self.y, self.transform, self.batch_size, self.seed = x, y, transform, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        for b in batches(len(self.x), self.batch_size, seed=self.seed):
            yield self.transform(self.x[b]), self.y[b]


# Fashion-MNIST training-set pixel mean and std (GPM's PMNIST loader normalises MNIST with its own
# 0.1307 / 0.3081 before permuting; these are the same statistics for Fashion-MNIST).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255).unsqueeze(1)


def normalise(x: torch.Tensor, on: bool) -> torch.Tensor:
    """(x - mean) / std with Fashion-MNIST's statistics when `on` (x in [0, 1])."""
    return x.sub_(FMNIST_MEAN).div_(FMNIST_STD) if on else x


def _subset(y: torch.Tensor, n: int | None, g: torch.Generator, classes=None) -> torch.Tensor:
    """A seeded, shuffled random subset of n indices (n // classes per class; all when n is None) of `classes`."""
    cls = sorted(set(y.tolist())) if classes is None else list(classes)
    return per_class_indices(y, cls, None if n is None else n // len(cls), g, shuffle=True)


def _split_val(idx: torch.Tensor, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(round(len(idx) * val_frac))
    return idx[n_val:], idx[:n_val]


def permuted_stream(n_tasks: int = 10, n_train: int | None = None, n_test: int | None = None,
                    val_frac: float = 0.1, seed: int = 0, data_path=None, normalize: bool = True) -> list[Task]:
    """GPM's PMNIST protocol on Fashion-MNIST: every task (the first too) is a fixed pixel permutation.

    Each task draws its own train subset (n_train images, None = all 60k) and holds out `val_frac`
    of it as validation; the test set is the same images under the task's permutation. Inputs are
    normalised by the dataset mean/std before permuting, as GPM's loader does (`normalize=False`: raw [0, 1]).
    """
    x, y = load_fashion_mnist("train", data_path)
    xt, yt = load_fashion_mnist("test", data_path)
    tasks = []
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        perm = torch.randperm(784, generator=g)
        tr, va = _split_val(_subset(y, n_train, g), val_frac)
        te = _subset(yt, n_test, torch.Generator().manual_seed(t))

        def tf(xb, perm=perm):
            return normalise(xb.reshape(len(xb), -1).float().div_(255), normalize)[:, perm]

        tasks.append(Task(t, f"perm{t}", x[tr], y[tr], xt[te], yt[te], tf, 10, x[va], y[va]))
    return tasks


def split_stream(classes_per_task: int = 2, n_train_per_class: int | None = None, n_test_per_class: int | None = None,
                 val_frac: float = 0.1, seed: int = 0, data_path=None, normalize: bool = True,
                 class_sets: list[tuple[int, ...]] | None = None) -> list[Task]:
    """Split Fashion-MNIST, labels 0..k-1 per task (multi-head): consecutive class pairs (0,1), (2,3), ...
    or the given `class_sets` (which may share classes; each task draws its own images)."""
    if class_sets is None:
        if 10 % classes_per_task:
            raise UserError(f"classes_per_task must divide 10, got {classes_per_task}")
        class_sets = [tuple(range(t * classes_per_task, (t + 1) * classes_per_task))
                      for t in range(10 // classes_per_task)]
    if len({len(c) for c in class_sets}) != 1 or any(len(set(c)) != len(c) or not set(c) <= set(range(10))
                                                     for c in class_sets):
        raise UserError(f"class_sets must be equal-sized tuples of distinct Fashion-MNIST classes 0-9, "
                        f"got {class_sets}")
    classes_per_task = len(class_sets[0])
    x, y = load_fashion_mnist("train", data_path)
    xt, yt = load_fashion_mnist("test", data_path)
    tasks = []

    def tf(xb):
        return normalise(to_float(xb), normalize)

    for t, cls in enumerate(class_sets):
        cls = list(cls)
        g = torch.Generator().manual_seed(seed * 1000 + t)
        n = None if n_train_per_class is None else n_train_per_class * classes_per_task
        tr, va = _split_val(_subset(y, n, g, cls), val_frac)
        nt = None if n_test_per_class is None else n_test_per_class * classes_per_task
        te = _subset(yt, nt, torch.Generator().manual_seed(t), cls)
        lut = torch.full((10,), -1, dtype=torch.long)
        lut[cls] = torch.arange(classes_per_task)
        tasks.append(Task(t, f"classes{cls}", x[tr], lut[y[tr]], xt[te], lut[yt[te]], tf, classes_per_task,
                          x[va], lut[y[va]]))
    return tasks


def rotated_stream(n_tasks: int = 10, step_degrees: float = 8.0, n_train: int = 1000, n_test: int | None = 2000,
                   val_frac: float = 0.1, seed: int = 0, data_path=None, normalize: bool = True) -> list[Task]:
    """Rotated Fashion-MNIST: task t = the 10-class problem rotated by t * step_degrees, few samples each.

    Neighbouring tasks are strongly (positively) correlated, so learning a later task can help an
    earlier, under-trained one: the setting where backward transfer is possible. Each task draws
    its own training images (disjoint draws are not enforced; they overlap by chance only).
    Images are rotated (zero fill) and then normalised, so the fill matches the background.
    """
    x, y = load_fashion_mnist("train", data_path)
    xt, yt = load_fashion_mnist("test", data_path)
    tasks = []
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        tr, va = _split_val(_subset(y, int(round(n_train / (1 - val_frac))), g), val_frac)
        te = _subset(yt, n_test, torch.Generator().manual_seed(t))
        deg = t * step_degrees

        def tf(xb, deg=deg):
            return normalise(rotate(to_float(xb), deg).flatten(1), normalize)

        tasks.append(Task(t, f"rot{deg:g}", x[tr], y[tr], xt[te], yt[te], tf, 10, x[va], y[va]))
    return tasks


def chunks_stream(n_tasks: int = 5, n_train: int = 500, n_test: int | None = 2000, val_frac: float = 0.1,
                  seed: int = 0, data_path=None, normalize: bool = True) -> list[Task]:
    """One 10-class Fashion-MNIST problem cut into `n_tasks` disjoint chunks of `n_train` images.

    Every task is the same problem (same labels, same test set), so every pair of tasks is
    positively correlated: later chunks carry information that improves the model on earlier
    ones, and an exact "do not change old outputs" constraint forbids exactly that improvement.
    """
    x, y = load_fashion_mnist("train", data_path)
    xt, yt = load_fashion_mnist("test", data_path)
    per = int(round(n_train / (1 - val_frac)))
    idx = _subset(y, None, torch.Generator().manual_seed(seed * 1000 + 7))
    if per * n_tasks > len(idx):
        raise UserError(f"{n_tasks} chunks of {per} images exceed the 60000 training images; lower n_train")
    te = _subset(yt, n_test, torch.Generator().manual_seed(0))

    def tf(xb):
        return normalise(to_float(xb).flatten(1), normalize)

    tasks = []
    for t in range(n_tasks):
        tr, va = _split_val(idx[t * per: (t + 1) * per], val_frac)
        tasks.append(Task(t, f"chunk{t}", x[tr], y[tr], xt[te], yt[te], tf, 10, x[va], y[va]))
    return tasks


# Related but distinct binary tasks: class pairs that share a class (0 T-shirt, 2 pullover, 4 coat,
# 6 shirt; 5 sandal, 7 sneaker, 9 ankle boot), so consecutive tasks share features and half the labels.
SHARED_PAIRS = ((0, 6), (6, 2), (2, 4), (4, 6), (5, 7), (7, 9))
