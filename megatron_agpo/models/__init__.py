"""Megatron policy models for Llama / Qwen2 checkpoints and HF <-> Megatron conversion.

Public API:
- ModelConfig.from_hf(hf_dir) -> ModelConfig
- build_model(cfg, sequence_parallel=False) -> GPTModel (this rank's shard)
- build_model_from_hf(hf_dir, load_weights=True, **overrides) -> (GPTModel, ModelConfig)
- load_hf_weights(model, hf_dir, cfg); megatron_to_hf_tensors(model_or_state, cfg)
- forward_logits(model, input_ids) -> vocab-parallel logits
- checkpoint.save_checkpoint / load_checkpoint / convert_hf_to_megatron / convert_megatron_to_hf
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_agpo.models.build import (
    FP8UnavailableError,
    build_model,
    layer_spec,
    mask_vocab_padding_,
    rope_inv_freq,
    transformer_config,
)
from megatron_agpo.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedModelError,
)
from megatron_agpo.models.weights import (
    GatherGroups,
    HFWeights,
    WeightMismatchError,
    fuse_qkv,
    gather_hf_tensors_to_rank0,
    hf_to_megatron_tensors,
    load_hf_weights,
    megatron_to_hf_tensors,
    split_qkv,
)


def build_model_from_hf(
    hf_dir: str | Path, load_weights: bool = True, sequence_parallel: bool = False, **overrides
):
    """ModelConfig from hf_dir/config.json, this rank's GPTModel, and (optionally) its weights.
    Parallel state must be initialised first (megatron_agpo.parallel.init_parallel)."""
    cfg = ModelConfig.from_hf(hf_dir, **overrides)
    model = build_model(cfg, sequence_parallel=sequence_parallel)
    if load_weights:
        load_hf_weights(model, hf_dir, cfg)
    return model, cfg


def forward_logits(model, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, Vp/TP] (this rank's vocab shard) of a single-stage model (PP=1), or the
    last stage's output when called inside a pipeline schedule. Causal attention, positions
    0..S-1."""
    pos_BS = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device).expand_as(input_ids_BS)
    return model(input_ids=input_ids_BS, position_ids=pos_BS, attention_mask=None)


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "FP8UnavailableError",
    "HFWeights",
    "ModelConfig",
    "UnsupportedModelError",
    "WeightMismatchError",
    "build_model",
    "build_model_from_hf",
    "forward_logits",
    "fuse_qkv",
    "hf_to_megatron_tensors",
    "layer_spec",
    "load_hf_weights",
    "mask_vocab_padding_",
    "GatherGroups",
    "gather_hf_tensors_to_rank0",
    "megatron_to_hf_tensors",
    "rope_inv_freq",
    "split_qkv",
    "transformer_config",
]
