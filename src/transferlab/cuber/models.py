"""Networks in GPM's style: bias-free layers, BatchNorm without running statistics, optional per-task heads.

Bias-free layers make "outputs on old inputs are unchanged" exact under projection, and BN with
`track_running_stats=False` uses batch statistics in train and eval, so no running buffer drifts
across tasks (GPM's AlexNet/ResNet code does the same; its BN affine grads are zeroed after task 0).
"""

from __future__ import annotations

import torch
from torch import nn


class MultiHeadCNN(nn.Module):
    """conv3x3(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, Linear(32*7*7, hidden), one head per task.

    Protected layers: `body.0`, `body.4`, `body.9` (two convs via im2col, one Linear); heads are task-specific.
    """

    def __init__(self, n_tasks: int, classes_per_task: int, width: int = 16, hidden: int = 100):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), bn(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), bn(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, hidden, bias=False), nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task, bias=False) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor, task_id: int = 0) -> torch.Tensor:
        return self.heads[task_id](self.body(x))


def multihead_forward(model: nn.Module, x: torch.Tensor, task_id: int) -> torch.Tensor:
    return model(x, task_id)
