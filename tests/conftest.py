"""Test defaults: CPU, offline, vendored data subset, one torch thread per test process."""

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["TRANSFERLAB_DATA"] = str(DATA)  # loaders prefer the vendored subset in tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA


def pytest_collection_modifyitems(config, items):
    """One convention for CUDA tests: mark them `@pytest.mark.cuda`; without a GPU they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_bert():
    """A factory for a small random BERT (2 layers, width 32, FFN 64): `tiny_bert(ff=64, layers=2, dropout=0.0)`."""
    transformers = pytest.importorskip("transformers")

    def make(ff: int = 64, layers: int = 2, dropout: float | None = None, seed: int = 0):
        torch.manual_seed(seed)
        extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=ff,
            **extra))

    return make
