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


# The end-to-end tests (demo, notebooks, compiled sampling, CLI training runs) take 20-240 s each; the rest take
# well under 10 s. scripts/test.sh runs the suite in one worker per core and hands each worker the next test when
# it is nearly idle (`--dist load --maxschedchunk 1`): starting the long ones first keeps the workers busy to the
# end (longest-first scheduling) instead of leaving one worker alone with a string of notebooks at the finish.
# Listed longest first (seconds measured with 2 workers of one thread each on the 2-core AMD EPYC).
LONGEST_FIRST = (
    "tests/test_demo.py::test_demo_quick_trains_both_stages_and_reports",       # 234
    "tests/test_demo.py::test_demo_autoencoders_writes_models_grids_and_report",  # 168
    "tests/test_notebooks.py::test_notebook_runs_in_quick_mode[03",              # 119
    "tests/test_demo.py::test_demo_quick_default_uses_the_shipped_autoencoder",  # 104
    "tests/test_notebooks.py::test_notebook_runs_in_quick_mode[02",              # 103
    "tests/test_notebooks.py::test_notebook_runs_in_quick_mode[04",              # 85
    "tests/test_notebooks.py::test_notebook_runs_in_quick_mode[08",              # 80
    "tests/test_pipeline.py::test_compiled_sampling",                            # 68 each
    "tests/test_notebooks.py",                                                   # 29-68 each
    "tests/test_cli.py::test_latent_training_writes_pipeline_and_eval",          # 50 and 20
    "tests/test_faults.py::test_killed_and_interrupted_runs",                    # 40
    "tests/test_bench.py",                                                       # 39 (its fixture)
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the order within a rank (and of every other test) is pytest's
