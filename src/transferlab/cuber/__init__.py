"""CUBER on GPM/TRGP: gradient-projection continual learning with backward knowledge transfer.

    from transferlab.cuber import GPM, CUBER, GPMConfig, CUBERConfig
    strategy = CUBER(model, CUBERConfig(thresholds=(0.95, 0.99, 0.99)))
    for t, loader in enumerate(task_loaders):
        strategy.before_task(t, loader); strategy.use_task(t)
        opt = torch.optim.SGD(list(model.parameters()) + strategy.extra_parameters(), lr=0.01)
        for x, y in loader:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); strategy.after_backward(model); opt.step()
        strategy.after_task(t, loader)
"""

from .config import CUBERConfig, EWCConfig, GPMConfig, TRGPConfig
from .memory import GradientProjectionMemory, grow_basis, im2col, left_spectrum, principal_angle_max
from .metrics import average_accuracy, backward_transfer, forgetting, forward_transfer
from .strategies import EWC, GPM, Finetune, Strategy
from .trgp import CUBER, TRGP, classify, in_subspace_step

__all__ = [
    "GradientProjectionMemory", "grow_basis", "im2col", "left_spectrum", "principal_angle_max",
    "Strategy", "Finetune", "EWC", "GPM", "TRGP", "CUBER", "classify", "in_subspace_step",
    "GPMConfig", "TRGPConfig", "CUBERConfig", "EWCConfig",
    "average_accuracy", "backward_transfer", "forward_transfer", "forgetting",
]
