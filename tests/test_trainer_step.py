"""One trainer update at TP=2 equals the same AGPO loss on transformers' model (float64)."""

import pytest
import torch

from megatron_agpo.algorithms import PolicyLossConfig, advantages, aggregation_weights
from megatron_agpo.ops import naive_agpo_loss
from megatron_agpo.trainer.batch import build_token_batch_from_lists
from tests.dist_utils import run_distributed


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


def make_batch(vocab: int, seed: int = 0, pad_multiple: int = 1):
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
    return build_token_batch_from_lists(
        prompts, responses, lps, adv, pad_id=0, pad_multiple=pad_multiple
    )


def hf_logp(hf_dir, batch):
    """transformers' float64 log-prob of every target token, [B, S] (0 at ignored ones)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=batch.input_ids).logits, -1)
    return lp.gather(-1, batch.target.clamp(min=0)[..., None]).squeeze(-1) * batch.loss_mask


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
        ref_logp=None if batch.ref_logp is None else batch.ref_logp.reshape(-1).double(),
        rollout_logp=batch.rollout_logp.reshape(-1).double(), dtype=torch.float64,
    )  # fmt: skip
    w = aggregation_weights(batch.loss_mask.double(), cfg.agg_mode)
    loss = (out.loss.view(b, s) * w).sum()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def gspo_reference_grads(hf_dir, batch, eps_low, eps_high):
    """GSPO from its paper's formula (tests/test_algorithms_parity.py) on transformers' model
    in float64: log-probs gathered from the logits, one advantage per row."""
    from transformers import AutoModelForCausalLM

    from tests.test_algorithms_parity import gspo_reference_loss

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64)
    lp = torch.log_softmax(model(input_ids=batch.input_ids).logits, -1)
    logp = lp.gather(-1, batch.target.clamp(min=0)[..., None]).squeeze(-1)
    mask = batch.loss_mask.double()
    first = mask.argmax(dim=1)  # a row's advantage is on each of its tokens
    adv = batch.advantages_per_token.double().gather(1, first[:, None]).squeeze(1)
    loss = gspo_reference_loss(logp, batch.old_logp.double(), adv, mask, eps_low, eps_high)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _body(
    rank,
    world,
    hf_dir,
    mode,
    token_budget=0,
    kl_coef=0.0,
    pp=1,
    gspo=False,
    packing=True,
    producer="torch",
):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.step import StepShape, compute_logp, forward_backward

    pc = ParallelConfig(tensor_parallel=world // pp, pipeline_parallel=pp)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, _ = wrap_for_training(model, pc)
    cfg = PolicyLossConfig(agg_mode=mode, kl_coef=kl_coef, producer=producer)
    triton_calls = []
    if producer == "triton":  # count that the kernel's autograd Function is the one used
        from megatron_agpo.ops import fused_agpo_loss as fal

        make = fal._triton_function
        fal._triton_function = lambda logits: triton_calls.append(1) or make(logits)
    if gspo:  # ranges that clip some of the rows' sequence ratios; the paper has no TIS
        cfg = PolicyLossConfig(
            agg_mode=mode, ratio_level="sequence", eps_low=0.03, eps_high=0.04,
            dual_clip_c=None, tis_cap=None,
        )  # fmt: skip
    batch = make_batch(mcfg.vocab_size)
    v = mcfg.vocab_size
    shape = StepShape(5, token_budget, packing)
    logp = compute_logp(ddp, batch, shape, v, producer=producer)
    ref_lp = hf_logp(hf_dir, batch)
    # Sorted, variable-size micro-batches, packed or not, give the same log-probs, in row order.
    other = compute_logp(ddp, batch, StepShape(5, 0, not packing), v)
    if ps.is_pipeline_last_stage():  # only the stage that computes the loss gets them
        torch.testing.assert_close(logp.double(), ref_lp, rtol=0, atol=2e-5)
        torch.testing.assert_close(logp, other, atol=1e-6, rtol=0)
    else:
        assert logp is None and other is None
    # Every stage needs the same old log-probs for the reference: transformers' own.
    batch.old_logp = ref_lp.float()
    if kl_coef:
        # Any fixed reference exercises the KL term's gradient; a shifted copy keeps KL > 0.
        batch.ref_logp = (batch.old_logp - 0.2 * torch.cos(batch.old_logp)) * batch.loss_mask
    # The old log-probs are the policy's own: perturb them so that clipping is exercised.
    wiggle = 0.3 * torch.sin(torch.arange(batch.old_logp.numel(), dtype=torch.float32))
    batch.old_logp = (batch.old_logp + wiggle.view_as(batch.old_logp)) * batch.loss_mask
    batch.agg_weights = aggregation_weights(batch.loss_mask, mode)
    ddp.zero_grad_buffer()
    metrics = forward_backward(ddp, batch, cfg, shape, v).to_dict()
    if kl_coef:
        assert metrics["all/kl"] > 0
    if gspo:  # some sequences clipped, not all: both branches of the sequence clip are used
        assert 0 < metrics["all/clip_frac"] < 1, metrics["all/clip_frac"]
    if producer == "triton":  # both passes (old log-probs and the update) on every rank
        assert len(triton_calls) >= 2, triton_calls
    grads = {n: p.main_grad for n, p in ddp.module.named_parameters()}
    offset = ps.get_pipeline_model_parallel_rank() * (mcfg.num_layers // pp)
    ours = dict(megatron_to_hf_tensors(grads, mcfg, layer_offset=offset))
    if gspo:
        ref_loss, ref = gspo_reference_grads(hf_dir, batch, cfg.eps_low, cfg.eps_high)
    else:
        ref_loss, ref = reference_grads(hf_dir, batch, cfg)
    # With PP every stage sees the last stage's metrics.
    assert metrics["all/tokens"] == batch.loss_mask.sum().item()
    expected = {n for n in ref if not (n == "lm_head.weight" and mcfg.tie_word_embeddings)}
    if pp == 1:
        assert set(ours) == expected
    else:  # this stage's share: its layers, plus the embedding or the final norm
        assert set(ours) < expected and any(".layers." in n for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.dist
@pytest.mark.parametrize(
    "mode,token_budget,kl_coef,pp,gspo,packing",
    [
        ("token-mean", 0, 0.0, 1, False, True),
        ("seq-mean-token-mean", 0, 0.0, 1, False, False),
        # Dynamic batch size (micro-batches by a 24-token budget) and the KL term.
        ("seq-mean-token-mean", 24, 0.1, 1, False, True),
        # Two pipeline stages, variable micro-batch shapes between them, packed and padded.
        ("token-mean", 24, 0.0, 2, False, True),
        ("token-mean", 24, 0.0, 2, False, False),
        # GSPO's sequence ratio against its paper's formula, in token-budget micro-batches.
        ("seq-mean-token-mean", 24, 0.0, 1, True, True),
    ],
)
def test_update_gradient_equals_transformers_reference(
    tiny_hf, mode, token_budget, kl_coef, pp, gspo, packing
):
    """TP=2 (pp=1) or PP=2 over two processes."""
    run_distributed(_body, 2, tiny_hf, mode, token_budget, kl_coef, pp, gspo, packing)


@pytest.mark.dist
def test_update_with_the_triton_producer_equals_transformers_reference(tiny_hf, monkeypatch):
    """algorithm.loss.producer=triton switches the logits path to the one-pass Triton kernel
    (Triton's interpreter on this CPU, set before the ranks start): the same log-probs and
    gradients as the float64 reference, at TP=2 with packed token-budget micro-batches."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_distributed(_body, 2, tiny_hf, "token-mean", 24, 0.0, 1, False, True, "triton")
