"""Offline data sources. Each loader takes an optional user path and otherwise searches, in order:
`$TRANSFERLAB_DATA/<name>`, the system package's folder, and `~/.cache/transferlab/<name>`.
A missing source raises `DataNotFoundError` naming the package to install or the variable to set.
"""

from .fashion_mnist import FMNIST_CLASSES, load_fashion_mnist
from .minilm import minilm_path
from .wordnet import SUPERSENSES_39, Synset, load_wordnet

__all__ = ["load_fashion_mnist", "FMNIST_CLASSES", "load_wordnet", "Synset", "SUPERSENSES_39", "minilm_path"]
