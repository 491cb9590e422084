"""One place that says which optional backends are active.

Every module that branches on Transformer Engine, apex, CUDA or vLLM asks here, so the
answer (and the reason a backend is off) is the same everywhere and shows up in one log line.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch


def _importable(name: str) -> bool:
    """True when `import name` would succeed. Imports it: a package may be on disk and still
    fail to import (transformer_engine without CUDA libraries, for one)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means the backend is off
        return False
    return True


@dataclass(frozen=True)
class Backends:
    """Which optional backends this process can use."""

    cuda: bool
    """A CUDA device is visible to torch."""
    transformer_engine: bool
    """transformer_engine imports *and* CUDA is present (TE layers and FP8 need both)."""
    apex: bool
    """NVIDIA apex imports (fused norms and Adam); megatron-core falls back to torch without."""
    vllm: bool
    """vLLM imports (rollout engine)."""

    def describe(self) -> str:
        on = [k for k, v in self.__dict__.items() if v]
        off = [k for k, v in self.__dict__.items() if not v]
        return f"backends on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}"


@functools.cache
def detect() -> Backends:
    """Probe once per process (imports are slow; the answer does not change)."""
    cuda = torch.cuda.is_available()
    return Backends(
        cuda=cuda,
        transformer_engine=cuda and _importable("transformer_engine"),
        apex=cuda and _importable("apex"),
        vllm=importlib.util.find_spec("vllm") is not None,
    )
