"""Fused kernels: the AGPO loss inside the vocab-parallel cross-entropy path."""

from megatron_agpo.ops.fused_agpo_loss import (
    IGNORE_INDEX,
    FusedLossOutput,
    fused_output_layer_agpo_loss,
    fused_vocab_parallel_agpo_loss,
)
from megatron_agpo.ops.reference import naive_agpo_loss

__all__ = [
    "IGNORE_INDEX",
    "FusedLossOutput",
    "fused_output_layer_agpo_loss",
    "fused_vocab_parallel_agpo_loss",
    "naive_agpo_loss",
]
