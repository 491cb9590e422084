import os

import pytest
import torch

# Tests are deterministic and single-threaded per process unless they say otherwise: the CI
# machine has 2 cores and multi-process tests would oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        # Every test gets a tier; unmarked ones are fast unit tests.
        if not any(m in item.keywords for m in ("dist", "slow", "gpu")):
            item.add_marker(pytest.mark.unit)
