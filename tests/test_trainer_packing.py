"""Packing is exact, and the step makes no host syncs per micro-batch.

- Packed equals padded in float64 (the megatron model cast to float64, no DDP so the
  gradients stay float64): every target's log-prob, the update's metric sums (per-token
  loss, ratios, entropy, token counts) and every gradient, at TP=2, PP=2, DP=2 and with the
  output layer fused into the loss. Positions run on continuously over a packed row: rotary
  scores depend only on the distance inside a sequence, and the block-diagonal mask keeps
  sequences apart. Exact up to rounding: the rotary angles of a sequence shifted along the
  row round differently (2e-10 on the log-probs here), so the bounds are 1e-9, where a
  cross-sequence leak or a misplaced token moves values by 1e-2 or more.
- Host syncs: every call that copies a device value to the host (`item`, `tolist`,
  `__bool__`, `__float__`, `__int__`, `nonzero`, `numpy`) is counted over one update
  (forward/backward, finiteness, optimizer step, metrics) with 1 and with 6 micro-batches;
  the counts are equal and small.
"""

import pytest
import torch

from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
from tests.dist_utils import run_distributed
from tests.test_trainer_step import make_batch


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


def _float64(model):
    model.double()
    model.config.params_dtype = torch.float64
    model.config.pipeline_dtype = torch.float64
    return model


def _run_mode(model, batch, cfg, shape, v):
    from megatron_agpo.trainer.step import compute_logp, forward_backward

    model.zero_grad(set_to_none=True)
    logp = compute_logp(model, batch, shape, v, fuse_output_layer=cfg.fuse_output_layer)
    metrics = forward_backward(model, batch, cfg, shape, v)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp, metrics.sums.clone(), grads


def _packed_body(rank, world, hf_dir, tp, pp, fuse):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel
    from megatron_agpo.trainer.batch import balanced_partition
    from megatron_agpo.trainer.step import StepShape

    init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    model, mcfg = build_model_from_hf(hf_dir)
    model = _float64(model)
    v = mcfg.vocab_size
    cfg = PolicyLossConfig(agg_mode="seq-mean-token-mean", fuse_output_layer=fuse)
    batch = make_batch(v)
    batch.rollout_logp = batch.rollout_logp.double()
    # Old log-probs away from the policy's, so that clipping and ratios are exercised.
    wiggle = 0.3 * torch.sin(torch.arange(batch.target.numel(), dtype=torch.float64))
    batch.old_logp = (batch.rollout_logp + wiggle.view_as(batch.target)) * batch.loss_mask
    batch.agg_weights = aggregation_weights(batch.loss_mask.double(), cfg.agg_mode)
    dp = ps.get_data_parallel_world_size()
    local = batch.select(
        balanced_partition(list(batch.lengths.seq), dp)[ps.get_data_parallel_rank()]
    )
    packed = _run_mode(model, local, cfg, StepShape(5, 24, packing=True), v)
    padded = _run_mode(model, local, cfg, StepShape(4, 0, packing=False), v)
    if ps.is_pipeline_last_stage():
        assert packed[0].dtype == torch.float64
        torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-9)
    else:
        assert packed[0] is None and padded[0] is None
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-9, atol=1e-9)
    assert packed[1][2 * 6].item() == batch.loss_mask.sum().item()  # all/tokens: every DP rank's
    assert packed[2].keys() == padded[2].keys() and packed[2]
    for name, g in packed[2].items():
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, padded[2][name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.dist
@pytest.mark.parametrize(
    "tp,pp,fuse",
    [(2, 1, False), (1, 2, False), (1, 1, False), (2, 1, True)],
    ids=["TP2", "PP2", "DP2", "TP2-fused"],
)
def test_packed_equals_padded_in_float64(tiny_hf, tp, pp, fuse):
    run_distributed(_packed_body, 2, tiny_hf, tp, pp, fuse)


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "numpy")

# Calls that read CPU tensors on every machine, so never wait on a device: megatron's RNG
# tracker compares the CPU generator's state around each forward (`random.py`), and without
# Transformer Engine / apex megatron falls back to torch's Adam, which reads its per-parameter
# step counters on the host (CPU only: GPU presets use the fused Adam).
HOST_ONLY = ("megatron/core/tensor_parallel/random.py", "torch/optim/", "megatron_agpo/compat.py")


class SyncCounter:
    """Counts calls of the Tensor methods that copy a device value to the host, by caller."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self._saved = {}

    def __enter__(self):
        import traceback

        for name in SYNC_METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapper(t, *a, _name=name, _orig=orig, **k):
                caller = traceback.extract_stack(limit=2)[0]
                where = caller.filename.split("site-packages/")[-1]
                if not any(h in where for h in HOST_ONLY):
                    key = f"{_name} {where.split('megatron_agpo/')[-1]}:{caller.lineno}"
                    self.calls[key] = self.calls.get(key, 0) + 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


def _sync_body(rank, world, hf_dir, out):
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.step import StepShape, forward_backward, grads_are_finite

    pc = ParallelConfig(tensor_parallel=1)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, opt = wrap_for_training(model, pc)
    v, cfg = mcfg.vocab_size, PolicyLossConfig()
    batch = make_batch(v)
    batch.old_logp = batch.rollout_logp.clone()
    batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)

    def update(shape):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        with SyncCounter() as c:
            m = forward_backward(ddp, batch, cfg, shape, v)
            finite = grads_are_finite(ddp)
            opt.step()
            m.to_dict()
        assert finite
        return c.calls

    update(StepShape(12, 0))  # warm-up: megatron's first step builds its state
    one = update(StepShape(12, 0))  # one micro-batch
    six = update(StepShape(2, 0))  # six micro-batches
    out.update(one=one, six=six)


@pytest.mark.dist
def test_host_syncs_per_update_do_not_grow_with_micro_batches(tiny_hf):
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run_distributed(_sync_to_file, 1, tiny_hf, str(Path(d) / "calls.json"))
        calls = json.loads((Path(d) / "calls.json").read_text())
    one, six = calls["one"], calls["six"]
    assert one == six, (one, six)
    # The metrics' one copy, the finiteness verdict, and what megatron's optimizer reads (its
    # grad norm): a handful per update, whatever the micro-batch count.
    ours = {k: n for k, n in one.items() if "trainer/" in k or "ops/" in k}
    assert sum(ours.values()) == 2, one
    assert sum(one.values()) <= 5, one


def _sync_to_file(rank, world, hf_dir, path):
    import json

    out: dict = {}
    _sync_body(rank, world, hf_dir, out)
    with open(path, "w") as f:
        json.dump(out, f)
