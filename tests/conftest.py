import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")


@pytest.fixture
def smoke_recipe() -> Path:
    return ROOT / "recipes" / "smoke" / "synthetic.yaml"
