"""Small shared models and training helpers."""

from .models import MLP, SmallCNN
from .train import accuracy, batches, evaluate_classifier

__all__ = ["MLP", "SmallCNN", "batches", "evaluate_classifier", "accuracy"]
