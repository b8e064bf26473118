"""Shared test settings: deterministic seeds, a headless matplotlib, and the repo root on sys.path."""
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
