"""Small shared models and training helpers."""

from .diffusion import Diffusion, flops_per_forward, train_diffusion
from .dit import DiT
from .models import MLP, SmallCNN
from .train import accuracy, batches, evaluate_classifier

__all__ = ["MLP", "SmallCNN", "DiT", "Diffusion", "train_diffusion", "flops_per_forward", "batches",
           "evaluate_classifier", "accuracy"]
