"""Offline by default, and the fixtures many test modules use (the helpers themselves are in helpers.py)."""
import os

import pytest
import torch
from helpers import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tokens():
    return torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
