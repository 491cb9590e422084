"""Numerics of the two sides of a run: FP8 training (whether this machine can do it, and how
the settings map onto megatron-core), and whether the rollout engine samples at a precision
other than the trainer's, in which case the trainer must correct with truncated importance
sampling.

Pure functions of their arguments except `check_fp8_available`, which asks
`megatron_agpo.backends.detect()` and CUDA about this machine.
"""

from __future__ import annotations

from typing import Any, Protocol

from megatron_agpo.backends import Backends, detect

FP8_FORMATS = ("e4m3", "hybrid")
"""megatron-core's FP8 formats: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)."""
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""Transformer Engine scaling recipes megatron-core names (TransformerConfig.fp8_recipe)."""
ROLLOUT_QUANTIZATIONS = ("", "fp8")
"""vLLM `quantization=` values the rollout engine accepts ("" = the checkpoint's dtype)."""

# Smallest CUDA compute capability with FP8 tensor cores for each recipe: per-tensor scaling
# needs Ada/Hopper (8.9), TE's 1x128 / 128x128 block scaling Hopper (9.0), MXFP8's hardware
# block scales Blackwell (10.0).
_MIN_CAPABILITY = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
}

# Transformer Engine's FP8 GEMMs need the token dimension of every linear input to be a
# multiple of 16 (and widths multiples of 16): the trainer pads sequences to this.
FP8_SEQUENCE_MULTIPLE = 16


class FP8UnavailableError(ValueError):
    """FP8 was requested where Transformer Engine on a capable CUDA GPU is not available."""


class _ModelPrecision(Protocol):
    params_dtype: str
    fp8: Any


class _EnginePrecision(Protocol):
    dtype: str
    quantization: str


def normalize_fp8(fp8: str | None) -> str | None:
    """None for "off" however it is spelled (None, "none", ""); else the format unchanged."""
    return None if fp8 in (None, "", "none", "None") else fp8


def check_fp8_settings(
    fp8: str | None,
    recipe: str,
    param_gather: bool,
    first_last_layers_bf16: bool,
    prefix: str = "",
) -> None:
    """Raise ValueError naming the field whose value does not fit (values only; no machine
    checks). `prefix` is how the caller's user spells the section, e.g. "model."."""
    fp8 = normalize_fp8(fp8)
    if fp8 is not None and fp8 not in FP8_FORMATS:
        raise ValueError(f"{prefix}fp8={fp8!r}: one of none, {', '.join(FP8_FORMATS)}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"{prefix}fp8_recipe={recipe!r}: one of {', '.join(FP8_RECIPES)}")
    if fp8 is None:
        for name, on in (
            ("fp8_param_gather", param_gather),
            ("first_last_layers_bf16", first_last_layers_bf16),
        ):
            if on:
                raise ValueError(f"{prefix}{name}=true needs {prefix}fp8=e4m3 or hybrid")
    elif first_last_layers_bf16 and recipe == "delayed":
        # megatron-core refuses this pair (TransformerConfig.__post_init__); say it in our keys.
        raise ValueError(
            f"{prefix}first_last_layers_bf16=true does not work with "
            f"{prefix}fp8_recipe=delayed in megatron-core: use tensorwise, blockwise or mxfp8"
        )


def fp8_unavailable_reason(
    fp8: str | None,
    recipe: str,
    backends: Backends,
    capability: tuple[int, int] | None,
    key: str = "fp8",
) -> str | None:
    """One line saying why FP8 `fp8`/`recipe` cannot run on a machine with these backends and
    this CUDA compute capability (None: no GPU), or None when it can (or FP8 is off)."""
    if normalize_fp8(fp8) is None:
        return None
    fix = "install the GPU stack (scripts/setup.sh --gpu) on a GPU node, or set " + key + "=none"
    if not backends.cuda:
        return (
            f"{key}={fp8} needs NVIDIA Transformer Engine (transformer_engine) on a CUDA GPU, "
            f"and CUDA is not available here; {fix}"
        )
    if not backends.transformer_engine:
        return (
            f"{key}={fp8} needs NVIDIA Transformer Engine (transformer_engine), which does not "
            f"import here; {fix}"
        )
    need = _MIN_CAPABILITY.get(recipe, (8, 9))
    if capability is not None and tuple(capability) < need:
        return (
            f"{key}={fp8} with fp8_recipe={recipe} needs Transformer Engine on a GPU of compute "
            f"capability {need[0]}.{need[1]} or newer; this GPU is "
            f"{capability[0]}.{capability[1]}"
        )
    return None


def check_fp8_available(fp8: str | None, recipe: str = "delayed", key: str = "fp8") -> None:
    """Raise FP8UnavailableError (one line, naming Transformer Engine) when FP8 is requested
    and this machine cannot run it."""
    if normalize_fp8(fp8) is None:
        return
    backends = detect()
    capability = None
    if backends.cuda:
        import torch

        capability = torch.cuda.get_device_capability()
    reason = fp8_unavailable_reason(fp8, recipe, backends, capability, key=key)
    if reason:
        raise FP8UnavailableError(reason)


def fp8_transformer_kwargs(
    fp8: str | None,
    recipe: str,
    param_gather: bool,
    first_last_layers_bf16: bool,
    amax_history_len: int = 1024,
    amax_compute_algo: str = "max",
    layers_at_start_in_bf16: int = 1,
    layers_at_end_in_bf16: int = 1,
) -> dict[str, Any]:
    """megatron-core TransformerConfig keyword arguments for these FP8 settings ({} when off).

    `param_gather` keeps FP8 copies of the GEMM weights (TransformerConfig.fp8_param), which
    is what lets the distributed optimizer all-gather parameters in FP8; the DDP side of it is
    `DistributedDataParallelConfig(fp8_param_gather=config.fp8_param)`."""
    if normalize_fp8(fp8) is None:
        return {}
    kw: dict[str, Any] = dict(fp8=fp8, fp8_recipe=recipe, fp8_param=bool(param_gather))
    if recipe == "delayed":
        # Only delayed scaling keeps an amax history; the other recipes compute scales now.
        kw.update(fp8_amax_history_len=amax_history_len, fp8_amax_compute_algo=amax_compute_algo)
    if first_last_layers_bf16:
        kw.update(
            first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=layers_at_end_in_bf16,
        )
    return kw


def model_overrides(model: Any) -> dict[str, Any]:
    """ModelConfig overrides for the precision fields of a trainer `ModelSection` (what
    `build_model_from_hf(path, **model_overrides(cfg.model))` needs)."""
    return dict(
        params_dtype=model.params_dtype,
        fp8=normalize_fp8(model.fp8),
        fp8_recipe=model.fp8_recipe,
        fp8_param_gather=bool(model.fp8_param_gather),
        first_last_layers_bf16=bool(model.first_last_layers_bf16),
    )


def trainer_precision(params_dtype: str, fp8: str | None) -> str:
    """What the trainer's GEMMs run in: "fp8-<format>" or the parameter dtype."""
    fp8 = normalize_fp8(fp8)
    return f"fp8-{fp8}" if fp8 else params_dtype


def engine_precision(dtype: str, quantization: str, checkpoint_dtype: str) -> str:
    """What vLLM's GEMMs run in. dtype="auto" takes the checkpoint's dtype, except that vLLM
    downcasts float32 checkpoints to the platform's preferred 16-bit type ("half" here: which
    one depends on the GPU)."""
    if quantization:
        return quantization
    if dtype != "auto":
        return dtype
    return "half" if checkpoint_dtype == "float32" else checkpoint_dtype


def needs_tis(model: _ModelPrecision, engine: _EnginePrecision) -> bool:
    """True when the rollout engine samples at another precision than the trainer computes
    log-probs at (FP8 on either side, or different dtypes), so the sampling distribution is
    not the trainer's old policy and truncated importance sampling must correct for it.
    The engine starts from the trainer's checkpoint, saved in model.params_dtype."""
    ours = trainer_precision(model.params_dtype, model.fp8)
    theirs = engine_precision(engine.dtype, engine.quantization, model.params_dtype)
    return ours != theirs


def resolve_tis_cap(
    tis_cap: float | None, required: bool, default_cap: float = 2.0
) -> float | None:
    """The truncated-IS cap the loss uses: the configured one, or `default_cap` where the
    configuration turned TIS off (tis_cap=None) but the precisions differ (`required`).
    The weight exp(old_logp - rollout_logp) is only informative with
    trainer.old_logp=recompute; with old_logp=rollout it is 1."""
    if tis_cap is None and required:
        return default_cap
    return tis_cap
