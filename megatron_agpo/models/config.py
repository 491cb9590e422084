"""ModelConfig: the architecture of a supported HF causal LM, read from its config.json.

One dataclass holds every default; `from_hf` fills it from a checkpoint, `validate` checks it
against a parallel layout and a tokenizer, and `megatron_agpo.models.build.transformer_config`
turns it into megatron-core's TransformerConfig.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from megatron_agpo.models.precision import check_fp8_settings, normalize_fp8

# HF `architectures[0]` -> family. Llama covers Llama 2/3/3.1 and SmolLM2; Qwen2 covers
# Qwen2, Qwen2.5 and Qwen2.5-Math (same layout: QKV bias, no other biases); Qwen3 covers the
# dense Qwen3 models (no biases, a per-head RMSNorm on queries and keys, head_dim set on its
# own: Qwen3-0.6B has 16 heads of 128 in a 1024-wide model).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # Qwen3 mixtures of experts (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention, every layer's
    # MLP a softmax top-k router over SwiGLU experts (no shared expert).
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

# float64 is for numerics tests on CPU (logits against transformers in double precision).
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


@dataclass
class ModelConfig:
    """Architecture and numerics of a Llama-, Qwen2- or Qwen3-family decoder."""

    architecture: str = "LlamaForCausalLM"
    """HF architecture name; one of SUPPORTED_ARCHITECTURES."""
    hidden_size: int = 576
    """Model width."""
    ffn_hidden_size: int = 1536
    """SwiGLU inner width (HF `intermediate_size`)."""
    num_layers: int = 30
    """Number of transformer layers."""
    num_attention_heads: int = 9
    """Query heads."""
    num_query_groups: int = 3
    """Key/value heads (GQA groups); equal to num_attention_heads for plain MHA."""
    head_dim: int = 64
    """Per-head width (HF `head_dim`, else hidden_size / num_attention_heads)."""
    vocab_size: int = 49152
    """Vocabulary size of the checkpoint (rows of the embedding in HF)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this. Kept independent of TP so checkpoints
    reshard; `validate` checks the padded size divides by TP."""
    max_position_embeddings: int = 8192
    """Longest sequence RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """HF rope scaling parameters; only `rope_type: llama3` (Llama 3.1+) is supported."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Output projection shares the input embedding."""
    qkv_bias: bool = False
    """Bias on the Q, K, V projections (always on in Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head (width head_dim, one weight shared by all heads)
    after the projection and before RoPE (always on in Qwen3; HF `q_norm` / `k_norm`)."""
    params_dtype: str = "float32"
    """Parameter dtype: float32, bfloat16, float16 (or float64, for numerics tests)."""
    bos_token_id: int | None = None
    """Special token ids, checked against the vocabulary."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s)."""
    pad_token_id: int | None = None
    """Padding id."""
    fp8: str | None = None
    """FP8 format for TE linear layers: None (off; "none" is read as None), 'e4m3' or
    'hybrid'. Needs Transformer Engine and CUDA."""
    fp8_recipe: str = "delayed"
    """TE FP8 scaling recipe: delayed, tensorwise, blockwise (Hopper+) or mxfp8 (Blackwell)."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history window (delayed scaling)."""
    fp8_amax_compute_algo: str = "max"
    """How the scale is computed from the amax history: 'max' or 'most_recent'."""
    fp8_param_gather: bool = False
    """Keep FP8 copies of the GEMM weights (TransformerConfig.fp8_param) so the distributed
    optimizer all-gathers parameters in FP8 (half the bytes of BF16)."""
    first_last_layers_bf16: bool = False
    """Run the first and last `num_layers_at_{start,end}_in_bf16` layers without FP8 (the
    layers most sensitive to it); not with fp8_recipe='delayed'."""
    num_layers_at_start_in_bf16: int = 1
    """Leading layers kept out of FP8 when first_last_layers_bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Trailing layers kept out of FP8 when first_last_layers_bf16."""
    num_experts: int = 0
    """Routed experts in each MoE layer (HF `num_experts`); 0 for a dense model."""
    moe_router_topk: int = 0
    """Experts each token is sent to (HF `num_experts_per_tok`)."""
    moe_ffn_hidden_size: int = 0
    """Each expert's SwiGLU width (HF `moe_intermediate_size`)."""
    moe_norm_topk_prob: bool = True
    """Renormalise each token's top-k routing probabilities to sum to 1 (HF
    `norm_topk_prob`; true in the released Qwen3-MoE checkpoints)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of megatron's load-balancing loss (`aux_loss`: experts x sum over experts of
    the fraction of tokens routed there x the mean routing probability, per layer) added to
    the training loss through the router; 0 turns it off. The checkpoint's own
    `router_aux_loss_coef` (a pre-training setting) is kept in `extra`, not applied."""
    init_method_std: float = 0.02
    """Std of the random init used before weights are loaded."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source config.json fields not used above (kept for the manifest and export)."""

    def __post_init__(self) -> None:
        self.fp8 = normalize_fp8(self.fp8)

    # ----- derived -----
    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    # ----- construction -----
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict, **overrides) -> ModelConfig:
        """Read an HF config.json (a folder, the file, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            p = Path(path_or_dict)
            hf = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        archs = hf.get("architectures") or []
        arch = (
            archs[0]
            if archs
            else {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(
                hf.get("model_type", ""), hf.get("model_type", "?")
            )
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r}: only 'silu' (SwiGLU)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        if family in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                f"{arch} use_sliding_window=True is not supported (sliding-window attention)"
            )
        if family in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
            # Both put the bias on o_proj too, which megatron's add_qkv_bias does not cover.
            raise UnsupportedModelError(f"{arch} attention_bias=True is not supported")

        # transformers >= 5 nests RoPE settings in `rope_parameters`; older files use
        # top-level `rope_theta` and `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or rope)
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype == "default":
            scaling = None
        elif rtype != "llama3":
            raise UnsupportedModelError(f"rope_type {rtype!r}: only 'default' and 'llama3'")

        heads = hf["num_attention_heads"]
        known = {
            "architecture": arch,
            "hidden_size": hf["hidden_size"],
            "ffn_hidden_size": hf["intermediate_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_query_groups": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
            "vocab_size": hf["vocab_size"],
            "max_position_embeddings": hf.get("max_position_embeddings", 8192),
            "rope_theta": float(theta),
            "rope_scaling": scaling,
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "qkv_bias": family == "qwen2",
            "qk_layernorm": family in ("qwen3", "qwen3_moe"),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": hf.get("eos_token_id"),
            "pad_token_id": hf.get("pad_token_id"),
        }
        if family == "qwen3_moe":
            known.update(_qwen3_moe_fields(hf, arch))
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        if dtype in _DTYPES:
            known["params_dtype"] = dtype
        known["extra"] = {k: v for k, v in hf.items() if k not in known}
        known.update(overrides)
        cfg = cls(**known)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_config(self) -> dict[str, Any]:
        """The HF config.json for this architecture (used on export)."""
        hf = dict(self.extra)
        hf.update(
            architectures=[self.architecture],
            model_type=self.family,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.params_dtype,
        )
        if self.is_moe:
            # The source's spelling: `num_experts` (released files) or `num_local_experts`
            # (written by transformers >= 5); both read back.
            hf["num_local_experts" if "num_local_experts" in hf else "num_experts"] = (
                self.num_experts
            )
            hf.update(
                num_experts_per_tok=self.moe_router_topk,
                moe_intermediate_size=self.moe_ffn_hidden_size,
                norm_topk_prob=self.moe_norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        hf.pop("torch_dtype", None)
        hf.pop("rope_scaling", None)
        hf["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            hf["rope_parameters"] = {**self.rope_scaling, "rope_theta": self.rope_theta}
        return hf

    # ----- validation -----
    def validate(
        self,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        tokenizer_vocab_size: int | None = None,
        special_token_ids: dict[str, int | None] | None = None,
        expert_parallel: int = 1,
    ) -> None:
        """Raise ValueError naming the field and value that do not fit."""
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype={self.params_dtype!r}: one of {sorted(_DTYPES)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        tp, pp = tensor_parallel, pipeline_parallel
        if self.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_parallel={tp}"
            )
        if self.num_query_groups % tp:
            raise ValueError(
                f"num_query_groups (KV heads)={self.num_query_groups} is not divisible by "
                f"tensor_parallel={tp}"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(
                f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tensor_parallel={tp}"
            )
        if self.padded_vocab_size % tp:
            raise ValueError(
                f"padded vocabulary {self.padded_vocab_size} (vocab_size={self.vocab_size}, "
                f"make_vocab_size_divisible_by={self.make_vocab_size_divisible_by}) is not "
                f"divisible by tensor_parallel={tp}"
            )
        if self.num_layers % pp:
            raise ValueError(
                f"num_layers={self.num_layers} is not divisible by pipeline_parallel={pp}"
            )
        if self.is_moe:
            if not 0 < self.moe_router_topk <= self.num_experts:
                raise ValueError(
                    f"moe_router_topk={self.moe_router_topk} must be between 1 and "
                    f"num_experts={self.num_experts}"
                )
            if self.moe_ffn_hidden_size <= 0:
                raise ValueError(f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be > 0")
            if self.num_experts % expert_parallel:
                raise ValueError(
                    f"num_experts={self.num_experts} is not divisible by "
                    f"parallel.expert_parallel={expert_parallel}"
                )
        elif expert_parallel > 1:
            raise ValueError(
                f"parallel.expert_parallel={expert_parallel} needs a mixture-of-experts model; "
                f"{self.architecture} is dense"
            )
        if tokenizer_vocab_size is not None and self.vocab_size < tokenizer_vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer_vocab_size} tokens"
            )
        ids = {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        ids.update(special_token_ids or {})
        for name, value in ids.items():
            for v in value if isinstance(value, list) else [value]:
                if v is not None and not 0 <= v < self.vocab_size:
                    raise ValueError(f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")
        check_fp8_settings(
            self.fp8, self.fp8_recipe, self.fp8_param_gather, self.first_last_layers_bf16
        )
        if self.fp8 is not None and self.first_last_layers_bf16:
            per_stage = self.num_layers // pp
            for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
                if not 0 <= getattr(self, name) <= per_stage:
                    raise ValueError(
                        f"{name}={getattr(self, name)} must be between 0 and the "
                        f"{per_stage} layers of a pipeline stage"
                    )

    def validate_tokenizer(self, tokenizer) -> None:
        """Check a HF tokenizer against the vocabulary (size and special tokens)."""
        specials = {
            f"tokenizer.{n}": getattr(tokenizer, n, None)
            for n in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        self.validate(tokenizer_vocab_size=len(tokenizer), special_token_ids=specials)


def _qwen3_moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config.json. Layers without experts (`mlp_only_layers`,
    `decoder_sparse_step` > 1; no released Qwen3-MoE has them) are refused."""
    if hf.get("mlp_only_layers"):
        raise UnsupportedModelError(
            f"{arch} mlp_only_layers={hf['mlp_only_layers']} is not supported (dense layers "
            "among the MoE layers)"
        )
    if hf.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(
            f"{arch} decoder_sparse_step={hf['decoder_sparse_step']} is not supported "
            "(only every layer an MoE layer)"
        )
    return {
        # transformers >= 5 writes `num_local_experts`; the released files `num_experts`.
        "num_experts": int(hf.get("num_experts") or hf["num_local_experts"]),
        "moe_router_topk": int(hf["num_experts_per_tok"]),
        "moe_ffn_hidden_size": int(hf["moe_intermediate_size"]),
        "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
    }
