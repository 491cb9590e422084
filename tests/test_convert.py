"""HF <-> Megatron checkpoint conversion: bit-exact round trips, resharding, the CLI tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_agpo.models import HFWeights, UnsupportedModelError
from megatron_agpo.models.checkpoint import convert_hf_to_megatron
from tests.tiny_models import tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


def _assert_bit_exact(src: Path, dst: Path) -> None:
    a, b = HFWeights(src), HFWeights(dst)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a:
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs after the round trip"


def _run_tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True)


def _export_and_check(src: Path, ckpt: Path, out: Path) -> None:
    _run_tool("tools/convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out", str(out))
    _assert_bit_exact(src, out)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    # transformers loads the export and computes the same logits as the source.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)("hello, world!", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)


@pytest.mark.e2e
@pytest.mark.dist
def test_roundtrip_fp32_llama_tp1(tmp_path):
    src = tiny_hf_model(tmp_path / "hf", "LlamaForCausalLM", dtype=torch.float32)
    _run_tool("tools/convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "ck"))
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert manifest["model_config"]["params_dtype"] == "float32"
    _export_and_check(src, tmp_path / "ck", tmp_path / "out")


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.slow
def test_roundtrip_bf16_qwen2_saved_at_tp2_exported_at_tp1(tmp_path):
    src = tiny_hf_model(tmp_path / "hf", "Qwen2ForCausalLM", dtype=torch.bfloat16,
                        tie_word_embeddings=True)  # fmt: skip
    _run_tool("tools/convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "ck"),
              "--tp", "2")  # fmt: skip
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["layout"]["tensor_parallel"] == 2
    _export_and_check(src, tmp_path / "ck", tmp_path / "out")


def test_unknown_architecture_refused_before_work(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})
    )
    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM, Qwen2"):
        convert_hf_to_megatron(tmp_path, tmp_path / "out")


def test_invalid_layout_refused_before_spawning(tmp_path):
    src = tiny_hf_model(tmp_path / "hf", "LlamaForCausalLM")
    with pytest.raises(ValueError, match="num_layers=2 is not divisible by pipeline_parallel=4"):
        convert_hf_to_megatron(src, tmp_path / "out", tp=1, pp=4)
