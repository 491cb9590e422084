"""Build a megatron-core GPTModel for a ModelConfig (this rank's TP shard / PP stage)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_agpo.backends import detect
from megatron_agpo.models.config import ModelConfig
from megatron_agpo.models.precision import (
    FP8UnavailableError,
    check_fp8_available,
    fp8_transformer_kwargs,
)

__all__ = [
    "FP8UnavailableError",
    "build_model",
    "fp8_kwargs",
    "layer_spec",
    "mask_vocab_padding_",
    "rope_inv_freq",
    "transformer_config",
    "uses_transformer_engine",
]


def uses_transformer_engine(cfg: ModelConfig, transformer_engine: bool) -> bool:
    """Whether the layers are Transformer Engine's: always for FP8 (only TE layers have FP8
    GEMMs), else wherever TE imports on CUDA (fused norm+linear)."""
    return cfg.fp8 is not None or transformer_engine


def layer_spec(cfg: ModelConfig):
    """ModuleSpec for one decoder layer: Transformer Engine's when TE imports and CUDA is
    present or FP8 is on (fused norm+linear, FP8-capable), megatron-core's local modules
    otherwise. Both name their weights so that `models.weights` maps them to HF."""
    from megatron.core.models.gpt import gpt_layer_specs

    if cfg.is_moe:
        from megatron_agpo.models.moe import moe_layer_spec

        te = uses_transformer_engine(cfg, detect().transformer_engine)
        if te:
            check_fp8_available(cfg.fp8, cfg.fp8_recipe)
        return moe_layer_spec(cfg, transformer_engine=te)
    if uses_transformer_engine(cfg, detect().transformer_engine):
        check_fp8_available(cfg.fp8, cfg.fp8_recipe)
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        normalization="RMSNorm", qk_layernorm=cfg.qk_layernorm
    )


def fp8_kwargs(cfg: ModelConfig) -> dict:
    """The FP8 part of the TransformerConfig keyword arguments for cfg ({} when FP8 is off);
    a pure mapping, checked on CPU by tests/test_fp8_config.py."""
    return fp8_transformer_kwargs(
        cfg.fp8,
        cfg.fp8_recipe,
        cfg.fp8_param_gather,
        cfg.first_last_layers_bf16,
        amax_history_len=cfg.fp8_amax_history_len,
        amax_compute_algo=cfg.fp8_amax_compute_algo,
        layers_at_start_in_bf16=cfg.num_layers_at_start_in_bf16,
        layers_at_end_in_bf16=cfg.num_layers_at_end_in_bf16,
    )


def transformer_config(cfg: ModelConfig, sequence_parallel: bool = False):
    """megatron-core TransformerConfig for cfg under the current parallel state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = (
        parallel_state.get_expert_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    cfg.validate(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
    backends = detect()
    check_fp8_available(cfg.fp8, cfg.fp8_recipe)
    dtype = cfg.torch_dtype
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        # Per-head q/k RMSNorm (Qwen3). The flag also makes megatron's finalize_model_grads
        # sum the q/k norm weights' gradients over TP: each rank norms only its own heads.
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # parallel.context_parallel (Transformer Engine's attention splits each sequence).
        context_parallel_size=parallel_state.get_context_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Softmax and RoPE tables in fp32, as HF does.
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not backends.cuda,
        # Fusions where the device has their kernels (backends.megatron_fusions decides).
        **_fusions(backends),
        **fp8_kwargs(cfg),
        # Experts, router, dispatcher (models/moe.py); nothing for a dense model.
        **_moe_kwargs(cfg, ep, uses_transformer_engine(cfg, backends.transformer_engine)),
    )


def _moe_kwargs(cfg: ModelConfig, expert_parallel: int, transformer_engine: bool) -> dict:
    from megatron_agpo.models.moe import moe_transformer_kwargs

    return moe_transformer_kwargs(cfg, expert_parallel, transformer_engine)


def _fusions(backends) -> dict:
    """The TransformerConfig switches of `megatron_fusions` (the overlap_* ones are DDP's)."""
    import dataclasses

    from megatron_agpo.backends import megatron_fusions

    f = dataclasses.asdict(megatron_fusions(backends))
    return {k: v for k, v in f.items() if not k.startswith("overlap_")}


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them (default and llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def build_model(
    cfg: ModelConfig,
    sequence_parallel: bool = False,
    pre_process: bool | None = None,
    post_process: bool | None = None,
):
    """GPTModel for this rank (its TP shard and PP stage). Parallel state must be initialised
    (`megatron_agpo.parallel.init_parallel`). Weights are randomly initialised; load them with
    `megatron_agpo.models.load_hf_weights` or `checkpoint.load_checkpoint`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config(cfg, sequence_parallel)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    spec = layer_spec(cfg)
    if tcfg.sequence_parallel and not uses_transformer_engine(cfg, detect().transformer_engine):
        # megatron's local torch norms refuse sequence parallelism; ours only mark their
        # weights for the TP gradient reduction (megatron_agpo/models/norm.py).
        from megatron_agpo.models.norm import (
            SequenceParallelTorchNorm,
            sequence_parallel_block_spec,
        )

        if cfg.qk_layernorm:
            # The q/k norms see whole sequences of this rank's heads (after the QKV gather), but
            # megatron's torch norm refuses any sequence-parallel config; the TP gradient sum
            # is done once either way (finalize_model_grads: qk_layernorm or sequence_parallel).
            attn = spec.submodules.self_attention.submodules
            attn.q_layernorm = attn.k_layernorm = SequenceParallelTorchNorm
        spec = sequence_parallel_block_spec(spec, tcfg)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )
    # megatron's llama3 scaling hard-codes (low=1, high=4, original=8192) and takes an int
    # theta; set the table from the checkpoint's own values so any llama3 config matches HF.
    device = model.rotary_pos_emb.inv_freq.device
    model.rotary_pos_emb.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.torch_dtype == torch.float64:
        # megatron's torch norms take no params_dtype and stay float32; a float64 model (the
        # numerics tests) must not round its norm weights to float32. inv_freq is no buffer,
        # so RoPE keeps float32 tables, as transformers does.
        model.double()
    if detect().cuda:
        model.cuda(torch.cuda.current_device())
    return model


def mask_vocab_padding_(logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Set logits of the padded vocabulary rows to -inf, in place, on this rank's
    vocab-parallel shard [..., V_padded / TP]. Without it the padded rows (zero weights) give
    logit 0 and take probability mass that the HF model does not have."""
    from megatron.core import parallel_state

    v_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    first_pad = cfg.vocab_size - start
    if first_pad < v_local:
        logits[..., max(first_pad, 0) :] = float("-inf")
    return logits
