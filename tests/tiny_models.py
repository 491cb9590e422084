"""Small random HF checkpoints for tests and benchmarks (offline): Llama / Qwen2 / Qwen3 /
Qwen3-MoE with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_model(
    out: str | Path,
    architecture: str = "LlamaForCausalLM",
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **overrides,
) -> Path:
    """A random small Llama / Qwen2 / Qwen3 / Qwen3-MoE checkpoint (GQA 4 heads / 2 KV heads,
    2 layers, vocab 100) with a word-level tokenizer, saved as an HF folder. Qwen3's heads are
    32 wide in a 64-wide model (head_dim set on its own, as in the real ones), so a layout that
    assumed hidden / heads would fail. Norm weights (q/k head norms included) and biases are
    random, not HF's ones and zeros, so a weight that is dropped or misplaced shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if architecture == "LlamaForCausalLM":
        kw["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }  # fmt: skip
        model_type = "llama"
    elif architecture == "Qwen2ForCausalLM":
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        model_type = "qwen2"
    elif architecture == "Qwen3ForCausalLM":
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        kw["head_dim"] = 32
        model_type = "qwen3"
    elif architecture == "Qwen3MoeForCausalLM":
        # 4 experts of width 48, 2 a token, renormalised as in the released models.
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        kw.update(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                  norm_topk_prob=True)  # fmt: skip
        model_type = "qwen3_moe"
    else:
        raise ValueError(f"no tiny config for {architecture}")
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # HF zero-inits biases; random ones exercise the bias layout
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
            elif n.endswith("mlp.gate.weight"):
                # Router logits of O(1) rather than O(0.1): clear top-k choices, so routing
                # is not decided by rounding (float32 engines against float64 references).
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    _tiny_tokenizer(kw["vocab_size"]).save_pretrained(out)
    return out


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = [chr(ord("!") + i) for i in range(vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
