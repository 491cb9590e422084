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


@dataclass(frozen=True)
class MegatronFusions:
    """megatron-core's device-dependent switches, decided in one place from `Backends`:
    on where the kernel they need exists, off elsewhere (CPU runs the unfused torch code,
    numerically the HF reference)."""

    gradient_accumulation_fusion: bool
    """Weight gradients as a bf16/fp16 GEMM accumulating in fp32 straight into `main_grad`:
    apex's `fused_weight_gradient_mlp_cuda` (megatron's parallel linears need it) on CUDA."""
    apply_rope_fusion: bool
    """Transformer Engine's fused rotary embedding."""
    bias_activation_fusion: bool
    """megatron's fused (bias-)SwiGLU, compiled for CUDA."""
    masked_softmax_fusion: bool
    """Always off: the only attention that reads it is megatron's local one, which packed
    micro-batches drive with a block-diagonal mask, and the fused causal kernel ignores a
    given mask (sequences would attend across each other). Transformer Engine's attention,
    the GPU path, is fused anyway."""
    persist_layer_norm: bool
    """apex's persistent layer norm kernel."""
    overlap_grad_reduce: bool
    """DDP reduces gradient buckets during the backward (NCCL on CUDA; gloo would serialise)."""
    overlap_param_gather: bool
    """Always off: the weight sync to the rollout engine reads every parameter right after
    each update, so the gather cannot wait for the next forward (it would send stale
    weights); it stays part of the optimizer step."""


def megatron_fusions(
    b: Backends | None = None, distributed_optimizer: bool = True
) -> MegatronFusions:
    b = b or detect()
    apex_wgrad = b.cuda and _importable("fused_weight_gradient_mlp_cuda")
    return MegatronFusions(
        gradient_accumulation_fusion=apex_wgrad,
        apply_rope_fusion=b.transformer_engine,
        bias_activation_fusion=b.cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=b.cuda and b.apex,
        overlap_grad_reduce=b.cuda,
        overlap_param_gather=False,
    )


# megatron-core warns once per module, on import, that it falls back to torch code when apex
# and Transformer Engine are absent: about 22 lines per rank on every CPU start, all saying the
# same thing. `describe_fallbacks` says it once.
KNOWN_FALLBACK_WARNINGS = (
    r"Apex is not installed\. Falling back",
    r"Transformer Engine and Apex are not installed",
    r"Transformer Engine is not installed",
    r"transformer_engine .*not installed",
    r"Apex is not installed",
)

# Other warnings every CPU run prints once, about megatron-core's own use of torch (nothing a
# user can act on); shown again with logging.verbosity=debug.
KNOWN_INTERNAL_WARNINGS = (
    r"full scope is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)
# A GPU tuning hint (meaningless without CUDA).
_CUDA_ONLY_WARNINGS = (r"When using async grad allreduce it is recommended to set",)

VERBOSITIES = ("quiet", "info", "debug")


def describe_fallbacks(b: Backends | None = None) -> str | None:
    """The one line that stands for megatron-core's fallback warnings; None when apex and
    Transformer Engine are both present (nothing falls back)."""
    b = b or detect()
    missing = [name for name, on in (("apex", b.apex), ("Transformer Engine", b.transformer_engine))
               if not on]  # fmt: skip
    if not missing:
        return None
    return f"backends: no {' / '.join(missing)}: torch fallbacks"


def vllm_log_level(verbosity: str) -> str:
    """VLLM_LOGGING_LEVEL for a `logging.verbosity`."""
    return {"quiet": "ERROR", "info": "WARNING", "debug": "DEBUG"}[verbosity]


def configure_logging(verbosity: str = "info", rank: int = 0, log=print) -> None:
    """Quiet start-up for `verbosity` (quiet, info, debug) on this rank.

    info / quiet: megatron-core's known fallback warnings are filtered and rank 0 prints
    `describe_fallbacks()` once instead; ranks > 0 print only errors (Python warnings off,
    logging at ERROR, transformers at error). vLLM's level follows `vllm_log_level` unless
    VLLM_LOGGING_LEVEL is already set (vLLM reads it at import, and replica processes inherit
    it). debug: nothing is filtered, on any rank.
    """
    import logging
    import os
    import warnings

    if verbosity not in VERBOSITIES:
        raise ValueError(f"logging.verbosity={verbosity!r}: one of {', '.join(VERBOSITIES)}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_log_level(verbosity))
    if verbosity == "debug":
        return
    quiet = KNOWN_FALLBACK_WARNINGS + KNOWN_INTERNAL_WARNINGS
    if not detect().cuda:
        quiet += _CUDA_ONLY_WARNINGS
    for pattern in quiet:
        warnings.filterwarnings("ignore", message=pattern)
    if rank != 0:
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    if verbosity == "quiet":
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    line = describe_fallbacks()
    if line:
        log(line)
