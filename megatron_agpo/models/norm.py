"""Norm layers for sequence-parallel activations when megatron-core's local spec is used.

megatron-core's torch norm (`WrappedTorchNorm`, the local spec's norm without apex) refuses
`sequence_parallel`. A norm is per token, so it runs unchanged on the [S/TP, B, H] shard each
TP rank holds; the one thing sequence parallelism needs is that the norm weights' gradients,
which each rank now computes from its own positions only, are summed over the TP group.
megatron's `finalize_model_grads` does that for every parameter marked `sequence_parallel`,
so the norm below only marks its weights. It is plugged in through megatron's ModuleSpec
(the layer spec and the block's final norm), not by patching megatron.
"""

from __future__ import annotations

import copy

import torch


class SequenceParallelTorchNorm:
    """torch RMSNorm / LayerNorm whose weights are reduced over TP under sequence parallelism.
    Same constructor as megatron's `WrappedTorchNorm`, so `build_module` can build it."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        kind = config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={kind!r}: RMSNorm or LayerNorm with sequence parallel")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def sequence_parallel_block_spec(layer_spec, config):
    """The decoder block spec for a local layer spec under sequence parallelism: its norms (and
    the block's final norm) become `SequenceParallelTorchNorm`."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec = copy.deepcopy(layer_spec)
    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm", "pre_cross_attn_layernorm"):
        if getattr(sub, name, IdentityOp) is not IdentityOp:
            setattr(sub, name, SequenceParallelTorchNorm)
    n = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=SequenceParallelTorchNorm)
