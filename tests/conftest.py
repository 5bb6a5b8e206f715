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
