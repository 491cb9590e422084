"""Megatron-LM training checkpoints (torch_dist format): finding the iteration folder, reading
its saved arguments safely, and the model config they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_agpo.models.checkpoint.errors import CheckpointError
from megatron_agpo.models.config import ModelConfig

MLM_TRACKER = "latest_checkpointed_iteration.txt"


def megatron_lm_dir(path: str | Path) -> Path | None:
    """The iteration folder of a Megatron-LM training checkpoint (torch_dist format): given
    its root (with latest_checkpointed_iteration.txt) or an iter_NNNNNNN folder; else None."""
    p = Path(path)
    if (p / MLM_TRACKER).is_file():
        it = (p / MLM_TRACKER).read_text().strip()
        d = p / ("release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else it)
        if not (d / ".metadata").is_file():
            raise CheckpointError(
                f"{p / MLM_TRACKER} names iteration {it!r}, but {d} holds no torch_dist "
                "checkpoint (.metadata); only the torch_dist format is read"
            )
        return d
    if (p.name.startswith("iter_") or p.name == "release") and (p / ".metadata").is_file():
        return p
    return None


def megatron_lm_args(iter_dir: Path) -> dict[str, Any]:
    """The training arguments saved in a Megatron-LM checkpoint (common.pt), read with
    torch's weights-only unpickler (argparse.Namespace admitted, nothing else)."""
    import argparse

    path = Path(iter_dir) / "common.pt"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: give the model config (--hf-config)") from None
    except Exception as e:  # noqa: BLE001 - refused types, corrupt file
        raise CheckpointError(
            f"{path}: its saved arguments cannot be read safely ({' '.join(str(e).split())[:300]}"
            "); give the model config instead (--hf-config config.json)"
        ) from None
    args = state.get("args") if isinstance(state, dict) else None
    if args is None:
        raise CheckpointError(f"{path} holds no saved arguments: give --hf-config")
    return vars(args)


def hf_config_from_megatron_lm_args(a: dict[str, Any], vocab_size: int | None) -> dict:
    """An HF config (Llama, or Qwen2 with QKV bias) equivalent to Megatron-LM's arguments."""

    def need(key: str, want) -> None:
        if a.get(key, want) != want:
            raise CheckpointError(
                f"Megatron-LM argument {key}={a.get(key)!r}: only {want!r} maps to the "
                "supported architectures (Llama, Qwen2)"
            )

    need("swiglu", True)
    need("normalization", "RMSNorm")
    need("position_embedding_type", "rope")
    heads = a["num_attention_heads"]
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    return {
        "architectures": ["Qwen2ForCausalLM" if a.get("add_qkv_bias") else "LlamaForCausalLM"],
        "model_type": "qwen2" if a.get("add_qkv_bias") else "llama",
        "hidden_size": a["hidden_size"],
        "intermediate_size": a["ffn_hidden_size"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups or heads,
        "head_dim": a.get("kv_channels") or a["hidden_size"] // heads,
        "vocab_size": vocab_size or a["padded_vocab_size"],
        "max_position_embeddings": a.get("max_position_embeddings", 4096),
        "rope_theta": float(a.get("rotary_base", 10000)),
        "rms_norm_eps": float(a.get("norm_epsilon", 1e-5)),
        "tie_word_embeddings": not a.get("untie_embeddings_and_output_weights", False),
        "hidden_act": "silu",
        "dtype": dtype,
    }


def megatron_lm_model_config(iter_dir: Path, hf_config, tokenizer) -> dict:
    """ModelConfig (as a dict) of a Megatron-LM checkpoint: from hf_config (a config.json or
    its folder) when given, else from the checkpoint's saved arguments; the embedding is
    padded as Megatron-LM padded it."""
    vocab = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    if hf_config is not None:
        return ModelConfig.from_hf(hf_config).to_dict()
    a = megatron_lm_args(iter_dir)
    cfg = ModelConfig.from_hf(hf_config_from_megatron_lm_args(a, vocab))
    # Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP.
    cfg.make_vocab_size_divisible_by = int(a.get("make_vocab_size_divisible_by", 128)) * int(
        a.get("tensor_model_parallel_size", 1)
    )
    return cfg.to_dict()
