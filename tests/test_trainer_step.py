"""One trainer update at TP=2 equals the same AGPO loss on transformers' model (float64)."""

import pytest
import torch

from megatron_agpo.algorithms import PolicyLossConfig, advantages, aggregation_weights
from megatron_agpo.ops import naive_agpo_loss
from megatron_agpo.trainer.batch import build_token_batch
from tests.dist_utils import run_distributed


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_agpo.models.pretrained import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


def make_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_prompts, group = 3, 4
    prompts, responses, lps = [], [], []
    for i in range(n_prompts * group):
        p = torch.randint(3, vocab, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(3, vocab, (2 + (i * 7) % 5,), generator=g).tolist()
        prompts.append(p)
        responses.append(r)
        lps.append((-torch.rand(len(r), generator=g) * 3).tolist())
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1])
    adv = advantages(rewards, group, "agpo", pos_weight=0.5)
    return build_token_batch(prompts, responses, lps, adv, pad_id=0)


def reference_grads(hf_dir, batch, cfg):
    """The same objective, computed on transformers' model in float64 with the naive loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    logits = model(input_ids=batch.input_ids).logits  # [B, S, V]
    b, s, v = logits.shape
    out = naive_agpo_loss(
        logits.reshape(b * s, v), batch.target.reshape(-1),
        batch.advantages_per_token.reshape(-1), cfg,
        old_logp=batch.old_logp.reshape(-1).double(),
        rollout_logp=batch.rollout_logp.reshape(-1).double(), dtype=torch.float64,
    )  # fmt: skip
    w = aggregation_weights(batch.loss_mask.double(), cfg.agg_mode)
    loss = (out.loss.view(b, s) * w).sum()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _body(rank, world, hf_dir, mode):
    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.step import compute_logp, forward_backward

    pc = ParallelConfig(tensor_parallel=world)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, _ = wrap_for_training(model, pc)
    cfg = PolicyLossConfig(agg_mode=mode)
    batch = make_batch(mcfg.vocab_size)
    batch.old_logp = compute_logp(ddp, batch, micro_batch_size=5, vocab_size=mcfg.vocab_size)
    # The old log-probs are the policy's own: perturb them so that clipping is exercised.
    wiggle = 0.3 * torch.sin(torch.arange(batch.old_logp.numel(), dtype=torch.float32))
    batch.old_logp = (batch.old_logp + wiggle.view_as(batch.old_logp)) * batch.loss_mask
    batch.agg_weights = aggregation_weights(batch.loss_mask, mode)
    ddp.zero_grad_buffer()
    metrics = forward_backward(ddp, batch, cfg, micro_batch_size=5, vocab_size=mcfg.vocab_size)
    grads = {n: p.main_grad for n, p in ddp.module.named_parameters()}
    ours = dict(megatron_to_hf_tensors(grads, mcfg))
    ref_loss, ref = reference_grads(hf_dir, batch, cfg)
    assert metrics["all/tokens"] == batch.loss_mask.sum().item()
    for name, g in ref.items():
        if name == "lm_head.weight" and mcfg.tie_word_embeddings:
            continue
        torch.testing.assert_close(ours[name].double(), g, rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_tp2_update_gradient_equals_transformers_reference(tiny_hf, mode):
    run_distributed(_body, 2, tiny_hf, mode)
