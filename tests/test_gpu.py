"""The GPU tier: the paths only a CUDA machine takes, each against an independent reference.

Every test is `@pytest.mark.gpu` (tests/conftest.py skips the marker without CUDA) and skips
itself, with the reason, when a further piece is missing (vLLM, Transformer Engine, a second
GPU). Run with `pytest -m gpu` or `scripts/gpu_check.sh` (docs/GPU.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_agpo.backends import detect
from tests.dist_utils import free_port
from tests.tiny_models import tiny_hf_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def cuda_world():
    """World size 1 over NCCL on cuda:0 with megatron's parallel state (TP=PP=DP=1); fp32
    matmuls without TF32 so results compare with the CPU's."""
    from megatron_agpo.parallel import ParallelConfig, destroy_parallel, init_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_parallel(ParallelConfig())
    yield torch.device("cuda", torch.cuda.current_device())
    destroy_parallel()


@pytest.fixture
def cuda():
    return torch.device("cuda")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("gpu") / "llama", "LlamaForCausalLM")


def _ids(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _megatron_logits(model, ids_BS, cfg):
    from megatron_agpo.models import mask_vocab_padding_

    pos = torch.arange(ids_BS.shape[1], device=ids_BS.device).expand_as(ids_BS)
    return mask_vocab_padding_(model(ids_BS, pos, None), cfg)


def test_model_forward_backward_on_cuda_matches_cpu_transformers(cuda_world, llama_dir):
    """Logits, loss and every parameter's gradient of megatron's GPTModel on CUDA (fp32)
    equal transformers' model on the CPU on the same weights and batch."""
    from transformers import AutoModelForCausalLM

    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors

    model, cfg = build_model_from_hf(llama_dir)
    assert next(model.parameters()).device.type == cuda_world.type
    ids = _ids(cfg.vocab_size)
    logits = _megatron_logits(model, ids.to(cuda_world), cfg)[..., : cfg.vocab_size]
    assert logits.device.type == cuda_world.type
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(cuda_world)
    )
    loss.backward()

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ref_logits = hf(ids).logits
    ref_loss = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ref_loss.backward()
    torch.testing.assert_close(logits.detach().cpu(), ref_logits.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.item(), ref_loss.item(), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref = dict(hf.named_parameters())
    seen = 0
    for name, g in megatron_to_hf_tensors(grads, cfg):
        torch.testing.assert_close(g.cpu(), ref[name].grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")  # fmt: skip
        seen += 1
    assert seen == len(ref), f"compared {seen} of {len(ref)} HF parameters"


def test_background_sync_stream_waits_for_the_update_and_the_next_update_for_it(cuda):
    """`overlap.BackgroundSync` on CUDA (trainer.background_sync): the sync's thread works on
    a stream of its own that starts after what the main stream queued before the sync (the
    optimizer step that wrote the weights), and after `join` the main stream's next work
    (the next optimizer step) runs after the thread's. Slow kernels queued in front of each
    write, without a host synchronisation, make a missing wait visible."""
    from megatron_agpo.trainer.overlap import BackgroundSync

    n = 1 << 22
    weights, buf = torch.zeros(n, device=cuda), torch.zeros(n, device=cuda)
    a = torch.randn(2048, 2048, device=cuda)

    def slow():  # tens of milliseconds of queued matmuls on the current stream
        for _ in range(100):
            a.copy_(torch.tanh(a @ a))

    slow()
    weights.add_(1.0)  # the update, queued behind them
    seen = {}

    def work():
        seen["stream"] = torch.cuda.current_stream()
        seen["weights"] = weights.clone()  # the gather's read, on the sync's stream
        slow()
        buf.fill_(7.0)  # written on the sync's stream, behind slow kernels
        return None, 0.0

    BackgroundSync(work, weights.device).join()
    after = buf.sum()  # queued on the main stream after the join
    weights.add_(1.0)  # the next update
    torch.cuda.synchronize()
    assert seen["stream"] != torch.cuda.current_stream()
    assert torch.equal(seen["weights"].cpu(), torch.ones(n))
    assert after.item() == 7.0 * n


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fused_loss_on_cuda_matches_float64_reference(dtype, tol, cuda):
    """The fused AGPO loss (logits and output-layer variants) on CUDA against the naive
    float64 CPU reference of tests/test_fused_loss.py."""
    from megatron_agpo.algorithms import PolicyLossConfig
    from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss
    from tests.test_fused_loss import CFG_FULL, make_problem, objective, reference

    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 64, 1000, 32, 11)
    ref_loss, ref_out, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    dev = cuda
    on = lambda t: t.to(dev, dtype) if t.is_floating_point() else t.to(dev)  # noqa: E731
    ex = {k: on(v) for k, v in extra.items()}
    z = on(hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, on(target), on(adv), cfg, chunk_size=48, **ex)
    loss = objective(out, on(mask), cfg.agg_mode)
    loss.backward()
    assert out.loss.device == z.device
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(z.grad.double().cpu(), gz, rtol=tol * 10, atol=tol)

    h, w = on(hidden).requires_grad_(), on(weight).requires_grad_()
    out2 = fused_output_layer_agpo_loss(h, w, on(target), on(adv), cfg, chunk_size=48, **ex)
    objective(out2, on(mask), cfg.agg_mode).backward()
    torch.testing.assert_close(h.grad.double().cpu(), gh, rtol=tol * 10, atol=tol)
    torch.testing.assert_close(w.grad.double().cpu(), gw, rtol=tol * 10, atol=tol)


def test_two_adam_steps_on_cuda_match_transformers(cuda_world, llama_dir):
    """A TP=1 training run of two steps on one GPU: megatron's DDP and distributed optimizer
    on CUDA change the loss exactly as transformers' model with torch AdamW on the CPU."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import OptimizerSettings, ParallelConfig, wrap_for_training
    from tests.test_models import LR, _hf_train_reference

    ids = _ids(100, batch=2, seq=10, seed=3)
    ref = _hf_train_reference(str(llama_dir), ids)
    model, cfg = build_model_from_hf(llama_dir)
    ddp, opt = wrap_for_training(model, ParallelConfig(), OptimizerSettings(lr=LR, clip_grad=0.0))
    inp, labels = ids[:, :-1].to(cuda_world), ids[:, 1:].to(cuda_world)

    def step(it, m):
        b = next(it)

        def loss_fn(logits_BSV):
            lg = logits_BSV[..., : cfg.vocab_size].float()
            loss = F.cross_entropy(lg.flatten(0, 1), labels.flatten())
            return loss, {"loss": loss.detach()}

        return _megatron_logits(m, b, cfg), loss_fn

    losses = []
    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([inp]), model=[ddp], num_microbatches=1,
            seq_length=inp.shape[1], micro_batch_size=inp.shape[0], forward_only=False,
        )  # fmt: skip
        ok, _, _ = opt.step()
        assert ok
        losses.append(out[0]["loss"].item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=0, atol=2e-4)


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (scripts/setup.sh --gpu)")
def test_agpo_train_two_steps_colocated_on_one_gpu(tmp_path):
    """`agpo-train` end to end on one GPU: TP=1, vLLM colocated in the trainer's process,
    two AGPO steps; the trainer-engine log-prob gap stays at numerical noise."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_agpo.train", "nproc=1", "parallel.tensor_parallel=1",
           "rollout=colocated", "trainer.steps=2", "trainer.eval_every=0",
           "model.warmstart_steps=50", f"model.cache_dir={tmp_path / 'cache'}",
           "rollout.engine.dtype=float32", "rollout.engine.gpu_memory_utilization=0.3",
           f"logging.run_dir={run_dir}", "logging.tensorboard=false",
           "logging.progress=false"]  # fmt: skip
    env = dict(os.environ, MASTER_PORT=str(free_port()))  # one process: no launcher picks it
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # A training step's row: "updated" is in every row the trainer's _step_metrics writes.
    steps = [r for r in rows if "updated" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["updated"] == 1 for r in steps)
    gaps = [v for r in steps for k, v in r.items() if k.endswith("logp_gap")]
    # fp32 on both sides: a working sync leaves kernel-order noise (< 1e-6 on CPU; vLLM's GPU
    # kernels may use TF32), a broken one a gap of order 1.
    assert gaps and max(gaps) < 1e-2, gaps


@pytest.mark.engine
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (scripts/setup.sh --gpu)")
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="NCCL refuses two ranks on one GPU: the trainer and a replica need a GPU each",
)
def test_weight_sync_over_nccl_reaches_parity(tmp_path):
    """Perturbed weights sent to a replica over the collective channel with NCCL: the
    replica's prompt log-probs then equal transformers' on the same weights (CPU, fp32)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_agpo.rollout import RolloutConfig
    from megatron_agpo.rollout.replicas import ReplicaPool
    from megatron_agpo.rollout.weight_sync import sync_and_verify

    path = tiny_hf_model(tmp_path / "llama", "LlamaForCausalLM")
    state = load_file(str(next(path.glob("*.safetensors"))))
    g = torch.Generator().manual_seed(0)
    new = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.load_state_dict(new, strict=False)
    probes = [_ids(100, 1, 12, s)[0].tolist() for s in range(3)]
    with torch.no_grad():
        ref = []
        for p in probes:
            lp = torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1], -1)
            ref.append(lp.gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist())
    cfg = RolloutConfig(model_path=str(path), dtype="float32", max_model_len=128,
                        num_replicas=1, sync_channel="collective", sync_backend="nccl",
                        replica_cuda_devices=("1",), gpu_memory_utilization=0.3)  # fmt: skip
    with ReplicaPool(cfg) as pool:
        report = sync_and_verify(pool, iter(new.items()), 1, probes, ref, tolerance=1e-3)
    assert report.max_abs_diff < 1e-3 and report.max_change_from_before > 0


@pytest.mark.skipif(
    not detect().transformer_engine, reason="Transformer Engine does not import here (needs CUDA)"
)
def test_fp8_forward_is_close_to_bf16(cuda_world, tmp_path):
    """The same weights through Transformer Engine layers in FP8 and in BF16: FP8 GEMMs ran
    (the logits differ) and stay close (relative error of a few per cent)."""
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.models.precision import check_fp8_available

    recipe = "tensorwise"
    try:
        check_fp8_available("hybrid", recipe)
    except ValueError as e:
        pytest.skip(str(e))
    # FP8 GEMMs want widths and token counts that are multiples of 16.
    path = tiny_hf_model(tmp_path / "llama", "LlamaForCausalLM", hidden_size=128,
                         intermediate_size=256, vocab_size=256)  # fmt: skip
    ids = _ids(256, batch=2, seq=32).to(cuda_world)
    out = {}
    for fp8 in (None, "hybrid"):
        model, cfg = build_model_from_hf(path, params_dtype="bfloat16", fp8=fp8, fp8_recipe=recipe)
        with torch.no_grad():
            out[fp8] = _megatron_logits(model, ids, cfg)[..., : cfg.vocab_size].float()
        del model
    rel = (out["hybrid"] - out[None]).norm() / out[None].norm()
    assert 0 < rel.item() < 0.1, rel.item()
