"""Megatron policy models: config, layouts, logit parity with transformers, TP/PP, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_agpo.models import (
    ModelConfig,
    UnsupportedModelError,
    WeightMismatchError,
    fuse_qkv,
    hf_to_megatron_tensors,
    rope_inv_freq,
    split_qkv,
)
from tests.dist_utils import run_distributed
from tests.tiny_models import tiny_hf_model

ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        # Llama: untied, llama3 rope scaling; Qwen2: tied embeddings, QKV bias.
        "LlamaForCausalLM": str(tiny_hf_model(root / "llama", "LlamaForCausalLM")),
        "Qwen2ForCausalLM": str(
            tiny_hf_model(root / "qwen2", "Qwen2ForCausalLM", tie_word_embeddings=True)
        ),
    }


# ----------------------------------------------------------------------------- unit
def test_config_from_hf_reads_architecture(tiny_dirs):
    llama = ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"])
    assert (llama.num_query_groups, llama.head_dim, llama.qkv_bias) == (2, 16, False)
    assert llama.rope_theta == 500000.0 and llama.rope_scaling["rope_type"] == "llama3"
    assert llama.padded_vocab_size == 128 and not llama.tie_word_embeddings
    qwen = ModelConfig.from_hf(tiny_dirs["Qwen2ForCausalLM"])
    assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.rope_scaling is None


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], "hidden_size": 8})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tensor_parallel=3), "num_attention_heads=4 is not divisible by tensor_parallel=3"),
        (dict(tensor_parallel=4), "num_query_groups .*=2 is not divisible by tensor_parallel=4"),
        (dict(pipeline_parallel=3), "num_layers=2 is not divisible by pipeline_parallel=3"),
        (dict(tokenizer_vocab_size=101), "vocab_size=100 is smaller than the tokenizer's 101"),
        (dict(special_token_ids={"eos_token_id": 100}), r"eos_token_id=100 is outside"),
    ],
)
def test_validation_names_the_problem(tiny_dirs, kwargs, message):
    cfg = ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=message):
        cfg.validate(**kwargs)


def test_tokenizer_validation(tiny_dirs):
    from transformers import AutoTokenizer

    cfg = ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"])
    tok = AutoTokenizer.from_pretrained(tiny_dirs["LlamaForCausalLM"])
    cfg.validate_tokenizer(tok)  # fits
    small = ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"], vocab_size=50)
    with pytest.raises(ValueError, match="smaller than the tokenizer's 100"):
        small.validate_tokenizer(tok)


def test_qkv_layout_is_grouped_and_shard_consistent():
    cfg = ModelConfig(num_attention_heads=8, num_query_groups=2, head_dim=3, hidden_size=24)
    q, k, v = torch.randn(24, 5), torch.randn(6, 5), torch.randn(6, 5)
    fused = fuse_qkv(q, k, v, cfg)
    # Group 0 = q heads 0..3, k head 0, v head 0 (megatron's layout), written out by hand.
    expected_g0 = torch.cat([q[:12], k[:3], v[:3]])
    torch.testing.assert_close(fused[:18], expected_g0, rtol=0, atol=0)
    # Fusing each TP shard and concatenating gives the full fused tensor.
    shards = [fuse_qkv(q[i * 12 : (i + 1) * 12], k[i * 3 : i * 3 + 3], v[i * 3 : i * 3 + 3], cfg)
              for i in range(2)]  # fmt: skip
    assert torch.equal(torch.cat(shards), fused)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v), strict=True))


def test_rope_inv_freq_matches_transformers(tiny_dirs):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = AutoConfig.from_pretrained(tiny_dirs["LlamaForCausalLM"])
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    got = rope_inv_freq(ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_shape_mismatch_names_parameter_and_shapes(tiny_dirs):
    cfg = ModelConfig.from_hf(tiny_dirs["LlamaForCausalLM"])
    hf = {"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}
    with pytest.raises(WeightMismatchError, match=r"linear_proj.weight.*\(64, 64\).*\(64, 32\)"):
        list(
            hf_to_megatron_tensors(
                hf.__getitem__,
                [("decoder.layers.0.self_attention.linear_proj.weight", torch.Size([64, 64]))],
                cfg,
            )  # fmt: skip
        )


# ----------------------------------------------------------------------------- multi-process
def _hf_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _gather_vocab(logits_local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() > 1:
        logits_local = gather_from_tensor_model_parallel_region(logits_local.contiguous())
    return logits_local[..., :vocab_size].float()


def _assert_parity(ours: torch.Tensor, ref: torch.Tensor, what: str, atol=1e-4) -> None:
    max_abs = (ours - ref).abs().max().item()
    # KL(ref || ours) per token, in float64 so it measures the models, not the reduction.
    lp, lq = F.log_softmax(ref.double(), -1), F.log_softmax(ours.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert max_abs < atol and kl < 1e-9, f"{what}: max|diff|={max_abs:.3g} KL={kl:.3g}"


def _ids(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids):
    """Logits of the whole (possibly pipelined) model; returned on the last PP stage only."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        from megatron_agpo.models import forward_logits

        with torch.no_grad():
            return forward_logits(model, ids)
    out = {}

    def step(it, m):
        b = next(it)
        y = m(b, torch.arange(b.shape[1]).expand_as(b), None)

        def keep(t):
            out["logits"] = t.detach()
            return t.sum() * 0, {}

        return y, keep

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
    )  # fmt: skip
    return out.get("logits")


def _parity_tp1_body(rank, world, dirs):
    from megatron_agpo.models import FP8UnavailableError, build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    ids = _ids()
    for arch in ARCHS:
        model, cfg = build_model_from_hf(dirs[arch])
        ours = _gather_vocab(_forward(model, ids), cfg.vocab_size)
        _assert_parity(ours, _hf_logits(dirs[arch], ids), f"{arch} TP=1")
    with pytest.raises(FP8UnavailableError, match="transformer_engine"):
        build_model_from_hf(dirs[ARCHS[0]], fp8="hybrid")


@pytest.mark.dist
def test_logit_parity_tp1(tiny_dirs):
    run_distributed(_parity_tp1_body, 1, tiny_dirs)


def _parity_tp2_reshard_body(rank, world, dirs, ckpt_root):
    from megatron_agpo.models import build_model, build_model_from_hf
    from megatron_agpo.models.checkpoint import load_checkpoint, save_checkpoint
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    ids = _ids(1)
    for arch in ARCHS:
        init_parallel(ParallelConfig(tensor_parallel=2))
        model, cfg = build_model_from_hf(dirs[arch])
        ref = _hf_logits(dirs[arch], ids)
        tp2 = _gather_vocab(_forward(model, ids), cfg.vocab_size)
        _assert_parity(tp2, ref, f"{arch} TP=2")
        ckpt = f"{ckpt_root}/{arch}"
        save_checkpoint(model, ckpt, cfg)
        # Same processes, new layout: TP=1 x DP=2; load the TP=2 checkpoint.
        init_parallel(ParallelConfig(tensor_parallel=1))
        model1 = build_model(cfg)
        load_checkpoint(model1, ckpt)
        tp1 = _gather_vocab(_forward(model1, ids), cfg.vocab_size)
        _assert_parity(tp1, ref, f"{arch} TP=2 checkpoint loaded at TP=1")
        torch.testing.assert_close(tp1, tp2, rtol=0, atol=1e-5)


@pytest.mark.dist
def test_logit_parity_tp2_and_reshard_to_tp1(tiny_dirs, tmp_path):
    run_distributed(_parity_tp2_reshard_body, 2, tiny_dirs, str(tmp_path))
    manifest = json.loads((tmp_path / "LlamaForCausalLM" / "manifest.json").read_text())
    layout = manifest["layout"]  # the manifest records the layout it was written with
    assert (layout["tensor_parallel"], layout["pipeline_parallel"]) == (2, 1)


def _parity_pp2_body(rank, world, dirs):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(pipeline_parallel=2))
    ids = _ids(2)
    for arch in ARCHS:
        model, cfg = build_model_from_hf(dirs[arch])
        assert len(model.decoder.layers) == 1  # one of two layers per stage
        logits = _forward(model, ids)
        if ps.is_pipeline_last_stage():
            _assert_parity(_gather_vocab(logits, cfg.vocab_size), _hf_logits(dirs[arch], ids),
                           f"{arch} PP=2")  # fmt: skip


@pytest.mark.dist
def test_logit_parity_pp2(tiny_dirs):
    run_distributed(_parity_pp2_body, 2, tiny_dirs)


# ----------------------------------------------------------------------------- training
LR = 1e-2


def _hf_train_reference(hf_dir: str, ids: torch.Tensor, steps: int = 2) -> list[float]:
    """Loss before each AdamW step of transformers' own model (the independent reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)  # fmt: skip
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _megatron_train(hf_dir: str, ids: torch.Tensor, parallel, steps: int = 2) -> list[float]:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_agpo.models import build_model_from_hf, mask_vocab_padding_
    from megatron_agpo.parallel import OptimizerSettings, init_parallel, wrap_for_training

    init_parallel(parallel)
    model, cfg = build_model_from_hf(hf_dir)
    ddp, opt = wrap_for_training(model, parallel, OptimizerSettings(lr=LR, clip_grad=0.0))
    inp, labels = ids[:, :-1], ids[:, 1:]

    def loss_fn(logits_BSV):
        mask_vocab_padding_(logits_BSV, cfg)  # padded rows must carry no probability
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits_BSV.float(), labels).mean()
        return loss, {"loss": loss.detach()}

    def step(it, m):
        b = next(it)
        return m(b, torch.arange(b.shape[1]).expand_as(b), None), loss_fn

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([inp]), model=[ddp], num_microbatches=1,
            seq_length=inp.shape[1], micro_batch_size=inp.shape[0], forward_only=False,
        )  # fmt: skip
        ok, _, _ = opt.step()
        assert ok
        if ps.is_pipeline_last_stage():
            losses.append(out[0]["loss"].item())
    return losses


def _train_body(rank, world, dirs):
    from megatron.core import parallel_state as ps

    from megatron_agpo.parallel import ParallelConfig

    ids = _ids(3, batch=2, seq=10)
    for arch in ARCHS:
        ref = _hf_train_reference(dirs[arch], ids)
        assert ref[1] < ref[0]
        for par in (ParallelConfig(tensor_parallel=2), ParallelConfig(pipeline_parallel=2),
                    ParallelConfig(tensor_parallel=1)):  # fmt: skip
            got = _megatron_train(dirs[arch], ids, par)
            if ps.is_pipeline_last_stage():
                torch.testing.assert_close(
                    torch.tensor(got), torch.tensor(ref), rtol=0, atol=2e-4,
                    msg=lambda m, a=arch, p=par: f"{a} {p}: {m}",
                )  # fmt: skip


@pytest.mark.dist
def test_train_step_tp2_pp2_match_transformers(tiny_dirs):
    """Forward, backward and a distributed-optimizer Adam step at TP=2, PP=2 and TP=1 x DP=2
    change the loss exactly as transformers' model with torch AdamW does."""
    run_distributed(_train_body, 2, tiny_dirs)
