"""A model with a SentencePiece tokenizer (tokenizer.model only, as Llama-2 ships it) goes
HF -> Megatron -> HF with its tokenizer, and HF (what the trainer loads), SentencePiece
itself and vLLM tokenize a fixed text identically."""

from __future__ import annotations

import json
import random

import pytest

from megatron_agpo.models.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
from tests.tiny_models import tiny_hf_model

TEXT = "two plus seven equals 123, the answer is \\boxed{130}"


def _sentencepiece_model(tmp_path):
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["one", "two", "three", "plus", "minus", "equals", "seven", "answer", "the", "is"]
    lines = [
        " ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 999)} \\boxed{{7}},"
        for _ in range(500)
    ]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=90, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return tmp_path / "sp.model"


@pytest.mark.dist  # one gloo process per conversion
def test_sentencepiece_tokenizer_survives_conversion(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp_model = _sentencepiece_model(tmp_path)
    hf = tiny_hf_model(tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / f).unlink(missing_ok=True)
    (hf / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True})
    )  # fmt: skip
    convert_hf_to_megatron(hf, tmp_path / "ck")
    convert_megatron_to_hf(tmp_path / "ck", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()

    want = [1, *spm.SentencePieceProcessor(model_file=str(sp_model)).encode(TEXT)]
    assert len(want) > 5
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == want
    assert AutoTokenizer.from_pretrained(tmp_path / "ck")(TEXT).input_ids == want
    from vllm.tokenizers import get_tokenizer

    assert get_tokenizer(str(out)).encode(TEXT) == want
