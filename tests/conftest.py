import os

import pytest
import torch

# Tests are deterministic and single-threaded per process unless they say otherwise: the CI
# machine has 2 cores and multi-process tests would oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


NOT_UNIT = ("dist", "engine", "e2e", "slow", "gpu", "slurm")
"""The tiers a test declares itself (pyproject.toml lists what each means). `unit` is the rest:
fast, one process, no vLLM engine, no subprocess. A test that starts an engine is marked
`engine`; one that runs agpo-train, another CLI or the SLURM controller as a subprocess,
`e2e`; one with several processes (gloo ranks, replica or reward workers), `dist`."""


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        declared = [m for m in NOT_UNIT if item.get_closest_marker(m)]
        if declared and item.get_closest_marker("unit"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked unit and {', '.join(declared)}: unit means fast, "
                "one process, no engine, no subprocess"
            )
        # Every test gets a tier; the ones that declare none are fast unit tests.
        if not declared:
            item.add_marker(pytest.mark.unit)
