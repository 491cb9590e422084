"""Router replay in the trainer's step (a tiny Qwen3-MoE, float64, one gloo rank): a
TokenBatch's `routes` reach every micro-batch (packed and padded alike) and the forwards of
`compute_logp` and `forward_backward` route each token to exactly those experts; without
routes the router chooses again (an earlier replay does not linger).

The routes are each token's experts drawn at random (not the router's own top-k), so a step
that ignored them would give other log-probs.
"""

from __future__ import annotations

import pytest
import torch

from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
from tests.dist_utils import run_distributed
from tests.test_trainer_step import make_batch


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("moe"), "Qwen3MoeForCausalLM",
                             dtype=torch.float64))  # fmt: skip


def _routes(batch, layers: int, experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """[B, S, L, K] distinct random experts for every position."""
    g = torch.Generator().manual_seed(seed)
    b, s = batch.input_ids.shape
    scores = torch.rand(b, s, layers, experts, generator=g)
    return scores.topk(k, dim=-1).indices


@torch.no_grad()
def _reference(model, cfg, batch, routes):
    """Each row alone, its routes (or the router's choice) set by hand: [B, S] log-probs."""
    from megatron_agpo.models import forward_logits
    from megatron_agpo.models.moe import set_router_replay

    model.eval()
    out = torch.zeros_like(batch.rollout_logp)
    for i, n in enumerate(batch.lengths.seq):
        ids = batch.input_ids[i : i + 1, :n]
        if routes is not None:
            set_router_replay(model, [r for r in routes[i, :n].permute(1, 0, 2)])
        lp = torch.log_softmax(forward_logits(model, ids)[0, :, : cfg.vocab_size], -1)
        set_router_replay(model, None)
        tgt = batch.target[i, :n]
        keep = tgt >= 0
        out[i, :n][keep] = lp[keep].gather(-1, tgt[keep][:, None])[:, 0]
    return out


def _body(rank, world, hf_dir):
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.models.moe import routers
    from megatron_agpo.parallel import ParallelConfig, init_parallel
    from megatron_agpo.trainer.step import StepShape, compute_logp, forward_backward

    init_parallel(ParallelConfig())
    model, cfg = build_model_from_hf(hf_dir)
    model.config.pipeline_dtype = torch.float64
    v, k = cfg.vocab_size, cfg.moe_router_topk
    batch = make_batch(v)
    batch.rollout_logp = batch.rollout_logp.double()
    routes = _routes(batch, cfg.num_layers, cfg.num_experts, k)
    replayed = batch.select(range(len(batch)))
    replayed.routes = routes
    want = _reference(model, cfg, batch, routes)
    own = _reference(model, cfg, batch, None)
    assert (want - own).abs().max() > 1e-2  # the drawn routes change the log-probs

    used: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda m, i, o: used.append(o[1].clone()))
               for r in routers(model)]  # fmt: skip
    for shape in (StepShape(5, 24, packing=True), StepShape(4, 0, packing=False)):
        used.clear()
        got = compute_logp(model, replayed, shape, v)
        # megatron rounds the routing weights to float32 (docs/MODELS.md): a row's logits
        # differ by rounding between a batch and the row alone, and the float32 weights then
        # by an ulp (1e-8 here); a token routed elsewhere moves its log-probs by 1e-2.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        # Every position of every micro-batch was routed to its given experts: the routing
        # maps the routers handed their dispatchers hold exactly the replayed experts.
        n_routed = sum(m.shape[0] for m in used) // cfg.num_layers
        assert n_routed >= sum(batch.lengths.seq)
        for m in used:
            assert (m.sum(-1) == k).all()
        # Without routes the routers choose again.
        torch.testing.assert_close(compute_logp(model, batch, shape, v), own, rtol=0, atol=1e-7)
    for h in handles:
        h.remove()
    # The update's forward and backward with replay: the same log-probs (ratio 1 against
    # old = replayed), and the router still gets a gradient.
    cfg_loss = PolicyLossConfig(agg_mode="seq-mean-token-mean")
    replayed.old_logp = want.clone()
    replayed.agg_weights = aggregation_weights(batch.loss_mask.double(), cfg_loss.agg_mode)
    model.train()
    model.zero_grad(set_to_none=True)
    forward_backward(model, replayed, cfg_loss, StepShape(4, 0, packing=False), v)
    g = model.decoder.layers[0].mlp.router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0


@pytest.mark.dist
def test_step_replays_routes_in_every_micro_batch(tiny_moe):
    run_distributed(_body, 1, tiny_moe)


def test_engine_routes_reach_the_token_batch_in_place():
    """Sample routes -> ScoredRollouts (set_routes, select) -> build_token_batch: each row's
    token t has its sample's experts of token t; a row's last token and the padding have
    experts 0..K-1."""
    from megatron_agpo.trainer.batch import build_token_batch
    from megatron_agpo.trainer.records import ScoredRollouts

    g = torch.Generator().manual_seed(0)
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[1, 2], [3, 4, 5, 6], [7]]
    L, K = 3, 2
    per = [torch.randint(0, 8, (len(p) + len(r) - 1, L, K), generator=g)
           for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    sr = ScoredRollouts.from_lists(prompts, responses, [[-1.0] * len(r) for r in responses],
                                   [False] * 3, [1.0, 0.0, 1.0], 0, 1)  # fmt: skip
    sr.set_routes(per)
    local = sr.select(torch.tensor([2, 0]))
    batch = build_token_batch(
        local.prompt_tokens, local.prompt_lens.tolist(), local.response_tokens,
        local.response_lens.tolist(), local.rollout_logp, torch.zeros(2), pad_id=0,
        pad_multiple=4, routes=local.routes,
    )  # fmt: skip
    assert batch.routes.shape == (2, 8, L, K)
    for row, i in enumerate((2, 0)):
        n = len(prompts[i]) + len(responses[i])
        assert torch.equal(batch.routes[row, : n - 1], per[i])
        assert (batch.routes[row, n - 1 :] == torch.arange(K)).all()
    with pytest.raises(ValueError, match=r"sample 1: engine routes \(3, 3, 2\) for 6 tokens"):
        sr.set_routes([per[0], per[1][:3], per[2]])


def _broadcast_body(rank, world):
    from megatron_agpo.trainer.records import ScoredRollouts, broadcast_scored

    prompts, responses = [[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 5]]
    per = [torch.arange((len(p) + len(r) - 1) * 3 * 2).view(-1, 3, 2) % 7
           for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    sr = ScoredRollouts.from_lists(prompts, responses, [[-1.0] * len(r) for r in responses],
                                   [False] * 2, [1.0, 0.0], 0, 1)  # fmt: skip
    sr.set_routes(per)
    got = broadcast_scored(sr if rank == 0 else None, torch.device("cpu"))
    assert got.routes is not None and torch.equal(got.routes, sr.routes)
    plain = ScoredRollouts.from_lists(prompts, responses, [[-1.0] * len(r) for r in responses],
                                      [False] * 2, [1.0, 0.0], 0, 1)  # fmt: skip
    assert broadcast_scored(plain if rank == 0 else None, torch.device("cpu")).routes is None


@pytest.mark.dist
def test_routes_are_broadcast_with_the_scored_rollouts():
    run_distributed(_broadcast_body, 2)
