"""Tiny HF checkpoints and transformers reference log-probs for rollout tests and benchmarks.

A 2-layer random Llama with a character-level tokenizer loads in vLLM in seconds on CPU, so
tests exercise the real engine without downloading anything. (Moved out of the package: test
helpers live under tests/.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


def make_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """A random fp32 Llama with the project's character tokenizer (and chat template), as an
    HF folder: the tiny builder (`tests.tiny_models.tiny_hf_model`) with weights
    drawn at std 0.2 (HF's 0.02 gives near-uniform next-token distributions; peaked ones make
    weight changes move log-probs visibly) and head_dim 32 (vLLM's CPU attention refuses 16).
    """
    from megatron_agpo.data.char_tokenizer import build_char_tokenizer
    from tests.tiny_models import tiny_hf_model

    out = Path(out_dir)
    tokenizer = build_char_tokenizer()
    tiny_hf_model(
        out,
        "LlamaForCausalLM",
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.2,
    )
    tokenizer.save_pretrained(str(out))  # replaces the builder's word-level tokenizer
    return out


def load_hf_model(path: str | Path) -> torch.nn.Module:
    """Load an HF causal LM in fp32 on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_token_logprobs(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], start: Sequence[int] | int = 1
) -> list[list[float]]:
    """log p(token_t | tokens_<t) in fp32 for t >= start (per sequence), one forward each.

    start=1 matches vLLM's prompt log-probs (the first token has none); start=len(prompt)
    gives the log-probs of a sampled response."""
    starts = [start] * len(sequences) if isinstance(start, int) else list(start)
    out: list[list[float]] = []
    for seq, s in zip(sequences, starts, strict=True):
        ids_T = torch.tensor([list(seq)], dtype=torch.long)
        logits_TV = model(ids_T).logits[0].float()
        logp_TV = torch.log_softmax(logits_TV, dim=-1)
        # Position t-1 predicts token t.
        tgt = ids_T[0, s:]
        out.append(logp_TV[s - 1 : -1].gather(-1, tgt[:, None])[:, 0].tolist())
    return out


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add seeded Gaussian noise (relative to each tensor's std) to every parameter in place."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.add_(noise * scale * (p.float().std().item() + 1e-3))


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an HF model's state dict as (hf_name, tensor), the shape of
    `megatron_to_hf_tensors`' output."""
    yield from model.state_dict().items()
