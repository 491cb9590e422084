"""Qwen3 dense (`Qwen3ForCausalLM`): config, the q/k head norms' weight rules, bit-exact HF <->
Megatron round trips at TP=1 and TP=2, logits equal to transformers' in float64, and a
training step equal to transformers' at TP=2 (the q/k norm gradients summed over TP).

The tiny Qwen3 (tests.tiny_models.tiny_hf_model) has 32-wide heads in a 64-wide
model, random q/k norm weights and tied embeddings, so a layout that assumed hidden / heads, a
dropped q/k norm or an untied output would each show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_agpo.models import (
    ModelConfig,
    UnsupportedModelError,
    hf_to_megatron_tensors,
)
from megatron_agpo.models.weights import HFWeights, rule_for, unpad_vocab
from megatron_agpo.plan.planner import ARCHS_DIR
from tests.dist_utils import run_distributed
from tests.test_models import _forward as _pipeline_forward
from tests.test_models import _megatron_train
from tests.tiny_models import tiny_hf_model

ARCH = "Qwen3ForCausalLM"


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {
        # float64 for the logit parity; tied embeddings as in Qwen3-0.6B .. 4B.
        "f64_tied": str(
            tiny_hf_model(root / "f64", ARCH, dtype=torch.float64, tie_word_embeddings=True)
        ),  # fmt: skip
        # float32, untied (as Qwen3-8B and larger), for the training step.
        "f32": str(tiny_hf_model(root / "f32", ARCH, seed=1)),
    }


# ----------------------------------------------------------------------------- unit
def test_config_reads_qwen3(qwen3_dirs):
    cfg = ModelConfig.from_hf(qwen3_dirs["f64_tied"])
    assert cfg.family == "qwen3" and cfg.qk_layernorm and not cfg.qkv_bias
    # head_dim is the checkpoint's (32), not hidden / heads (16).
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (64, 4, 32)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and cfg.params_dtype == "float64"
    assert not ModelConfig.from_hf(qwen3_dirs["f32"]).tie_word_embeddings


def test_exported_config_is_transformers_qwen3(qwen3_dirs):
    """The config.json written on export reads back into the same ModelConfig and into
    transformers' Qwen3Config with the same head width, theta and biases."""
    from transformers import AutoConfig

    cfg = ModelConfig.from_hf(qwen3_dirs["f64_tied"])
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf(hf) == cfg
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "transformers_version"})
    assert type(hf_cfg).__name__ == "Qwen3Config"
    assert (hf_cfg.head_dim, hf_cfg.attention_bias) == (32, False)
    assert hf_cfg.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"attention_bias": True}, "Qwen3ForCausalLM attention_bias=True is not supported"),
        ({"use_sliding_window": True}, "Qwen3ForCausalLM use_sliding_window=True"),
    ],
)
def test_unsupported_qwen3_options_refused(qwen3_dirs, extra, message):
    hf = json.loads(Path(qwen3_dirs["f32"], "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf({**hf, **extra})


def test_unsupported_architecture_keeps_one_line_error():
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], "hidden_size": 8})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        "architecture 'MixtralForCausalLM' is not supported; supported: "
        "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    )


def test_qk_norm_rules_are_replicated(qwen3_dirs):
    cfg = ModelConfig.from_hf(qwen3_dirs["f32"])
    for m, h in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
        rule = rule_for(f"decoder.layers.1.self_attention.{m}.weight", cfg, layer_offset=2)
        assert rule.hf_names == (f"model.layers.3.self_attn.{h}.weight",) and rule.tp_dim is None
    with pytest.raises(KeyError, match="linear_qkv.bias"):  # Qwen3 has no QKV bias
        rule_for("decoder.layers.0.self_attention.linear_qkv.bias", cfg)


def _megatron_shapes(cfg: ModelConfig, t: int) -> list[tuple[str, torch.Size]]:
    """The local parameters of a TP=t rank of megatron's GPTModel for a Qwen3 config, written
    out by hand (the dist test below checks them against the model megatron builds)."""
    H, F_, D, Q, G = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim,
                      cfg.num_attention_heads, cfg.num_query_groups)  # fmt: skip
    S = torch.Size
    out = [("embedding.word_embeddings.weight", S([cfg.padded_vocab_size // t, H]))]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out += [
            (p + "input_layernorm.weight", S([H])),
            (p + "self_attention.linear_qkv.weight", S([(Q + 2 * G) * D // t, H])),
            (p + "self_attention.q_layernorm.weight", S([D])),
            (p + "self_attention.k_layernorm.weight", S([D])),
            (p + "self_attention.linear_proj.weight", S([H, Q * D // t])),
            (p + "pre_mlp_layernorm.weight", S([H])),
            (p + "mlp.linear_fc1.weight", S([2 * F_ // t, H])),
            (p + "mlp.linear_fc2.weight", S([H, F_ // t])),
        ]
    out.append(("decoder.final_layernorm.weight", S([H])))
    if not cfg.tie_word_embeddings:
        out.append(("output_layer.weight", S([cfg.padded_vocab_size // t, H])))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which", ["f64_tied", "f32"])
def test_weight_rules_round_trip_bit_exact(qwen3_dirs, which, tp):
    """HF -> every TP rank's megatron shards -> HF, by the rules alone (one process): every
    HF tensor comes back bit-exact and none is left out."""
    hf = HFWeights(qwen3_dirs[which])
    cfg = ModelConfig.from_hf(qwen3_dirs[which])
    shapes = _megatron_shapes(cfg, tp)
    shards = [dict(hf_to_megatron_tensors(hf.get, shapes, cfg, r, tp)) for r in range(tp)]
    back: dict[str, torch.Tensor] = {}
    for name, _ in shapes:
        rule = rule_for(name, cfg)
        per_rank = [rule.to_hf(shards[r][name]) for r in range(tp)]
        for j, hf_name in enumerate(rule.hf_names):
            pieces = [p[j] for p in per_rank]
            if rule.tp_dim is None:
                assert all(torch.equal(pieces[0], x) for x in pieces)  # replicated
                full = pieces[0]
            else:
                full = torch.cat(pieces, dim=rule.tp_dim)
            back[hf_name] = unpad_vocab(full, cfg) if rule.vocab else full
    assert sorted(back) == sorted(hf.keys())
    for name in hf:
        a, b = hf.get(name), back[name]
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_qwen3_8b_architecture_file():
    """plan/archs/Qwen3-8B.json reads as Qwen3-8B and fits the preset's TP=4."""
    cfg = ModelConfig.from_hf(ARCHS_DIR / "Qwen3-8B.json")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size) == (
            36, 4096, 32, 8, 128, 12288, 151936)  # fmt: skip
    assert cfg.qk_layernorm and not cfg.qkv_bias and not cfg.tie_word_embeddings
    assert cfg.rope_theta == 1e6 and cfg.params_dtype == "bfloat16"
    cfg.validate(tensor_parallel=4)


def test_qwen3_8b_preset_fits_by_the_planner(capsys):
    from megatron_agpo.plan.cli import main as plan_main
    from megatron_agpo.plan.cli import plan_from_overrides

    assert plan_main(["model=qwen3_8b", "--check"]) == 0
    assert capsys.readouterr().out.startswith("agpo-plan: FITS")
    plan = plan_from_overrides(["model=qwen3_8b"])[0]
    assert (plan.layout.tp, plan.layout.sequence_parallel, plan.layout.engines) == (4, True, 4)
    # Counted by hand: embeddings and the untied output 2 x 151936 x 4096; per layer q/o
    # 2 x 4096^2, k/v 2 x 4096 x 1024, SwiGLU 3 x 4096 x 12288, norms 2 x 4096 + q/k 2 x 128;
    # the final norm. The planner leaves the q/k norms (9,216 parameters) out.
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    hand = 2 * 151936 * 4096 + 36 * layer + 4096
    assert hand == 8_190_735_360 and 0 <= hand - plan.params <= 36 * 2 * 128


# ----------------------------------------------------------------------------- multi-process
def _hf_model(hf_dir: str, dtype: torch.dtype, norms_in_input_dtype: bool = False):
    """transformers' model. Its RMSNorm computes in float32 whatever the input dtype (a
    float64 model's norms are rounded to float32); norms_in_input_dtype=True keeps the same
    formula in the input's dtype, for a reference that is float64 throughout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    if norms_in_input_dtype:

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

        for m in model.modules():
            if type(m).__name__ == "Qwen3RMSNorm":
                m.eps = m.variance_epsilon
                m.forward = forward.__get__(m)
    return model


def _ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _full_logits(model, ids, cfg):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_agpo.models import forward_logits

    model.eval()
    with torch.no_grad():
        local = forward_logits(model, ids)
    if ps.get_tensor_model_parallel_world_size() > 1:
        local = gather_from_tensor_model_parallel_region(local.contiguous())
    return local[..., : cfg.vocab_size]


def _parity_body(rank, world, dirs, results_path):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import (
        build_model_from_hf,
        gather_hf_tensors_to_rank0,
        megatron_to_hf_tensors,
    )
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    hf_dir = dirs["f64_tied"]
    ids = _ids(0)
    with torch.no_grad():
        ref = _hf_model(hf_dir, torch.float64)(ids).logits
        ref64 = _hf_model(hf_dir, torch.float64, norms_in_input_dtype=True)(ids).logits
    assert ref.dtype == ref64.dtype == torch.float64
    hf = HFWeights(hf_dir)
    report = {}
    for tp, sp in ((1, False), (2, False), (2, True)):
        init_parallel(ParallelConfig(tensor_parallel=tp))
        model, cfg = build_model_from_hf(hf_dir, sequence_parallel=sp)
        params = dict(model.named_parameters())
        assert params["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (32,)
        assert params["embedding.word_embeddings.weight"].dtype == torch.float64
        # The hand-written shapes of the one-process round trip are megatron's.
        expected = dict(_megatron_shapes(cfg, tp))
        assert {n: p.shape for n, p in params.items()} == expected
        got = _full_logits(model, ids, cfg)
        key = f"tp{tp}{'_sp' if sp else ''}"
        diff = report[key] = (got - ref).abs().max().item()
        diff64 = report[key + "_norms_f64"] = (got - ref64).abs().max().item()
        # Logits are O(1); a dropped q/k norm or a wrong head layout moves them by O(0.1).
        assert diff < 1e-6, f"TP={tp} SP={sp}: max|logits - transformers'| = {diff:.3g}"
        assert diff64 < 1e-12, f"TP={tp} SP={sp}: vs float64 norms {diff64:.3g}"
        # Megatron -> HF (TP shards all-gathered): bit-exact with the source checkpoint.
        back = dict(megatron_to_hf_tensors(model, cfg))
        assert sorted(back) == sorted(hf.keys())
        for name in hf:
            assert torch.equal(back[name], hf.get(name)), f"TP={tp}: {name} differs"
    # PP=2: one layer per stage (global HF layer indices), the tied output layer's copy on
    # the last stage; logits there, every HF tensor gathered to rank 0.
    init_parallel(ParallelConfig(pipeline_parallel=2))
    model, cfg = build_model_from_hf(hf_dir)
    assert len(model.decoder.layers) == 1
    logits = _pipeline_forward(model, ids)
    if ps.is_pipeline_last_stage():
        got = logits[..., : cfg.vocab_size]
        report["pp2_norms_f64"] = diff64 = (got - ref64).abs().max().item()
        assert diff64 < 1e-12, f"PP=2: vs float64 norms {diff64:.3g}"
    back = dict(gather_hf_tensors_to_rank0(model, cfg))
    if rank == 0:
        assert sorted(back) == sorted(hf.keys())
        for name in hf:
            assert torch.equal(back[name], hf.get(name)), f"PP=2: {name} differs"
    with open(f"{results_path}.{rank}", "w") as f:
        json.dump(report, f)


@pytest.mark.dist
def test_logits_equal_transformers_float64_and_round_trip_tp_pp(qwen3_dirs, tmp_path):
    """float64 logits of megatron's model (TP=1, TP=2, TP=2 with sequence parallelism, PP=2)
    equal transformers' Qwen3ForCausalLM: to 1e-12 with transformers' norms kept in float64
    (as shipped they round to float32: 1e-6), and the weights gathered back to HF are
    bit-exact."""
    out = tmp_path / "parity.json"
    run_distributed(_parity_body, 2, qwen3_dirs, str(out))
    print({r: json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)})


LR = 1e-2


def _hf_train(hf_dir: str, ids: torch.Tensor, steps: int) -> list[float]:
    model = _hf_model(hf_dir, torch.float64).train()
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


def _train_body(rank, world, hf_dir, steps):
    from megatron_agpo.parallel import ParallelConfig

    ids = _ids(3, batch=2, seq=10)
    ref = _hf_train(hf_dir, ids, steps)
    assert ref[-1] < ref[0]
    for par in (ParallelConfig(tensor_parallel=2), ParallelConfig(tensor_parallel=1)):
        got = _megatron_train(hf_dir, ids, par, steps=steps)
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(ref), rtol=0, atol=2e-4,
            msg=lambda m, p=par: f"{p}: {m}",
        )  # fmt: skip


@pytest.mark.dist
def test_train_steps_tp2_match_transformers(qwen3_dirs):
    """Forward, backward and Adam steps at TP=2 and TP=1 x DP=2 lower the loss exactly as
    transformers' model with torch AdamW does. At TP=2 each rank norms its own query/key
    heads, so the q/k norm gradients are right only once summed over TP."""
    run_distributed(_train_body, 2, qwen3_dirs["f32"], 3)


def _grads_body(rank, world, hf_dir, results_path):
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_agpo.models import (
        build_model_from_hf,
        mask_vocab_padding_,
        megatron_to_hf_tensors,
    )
    from megatron_agpo.parallel import (
        OptimizerSettings,
        ParallelConfig,
        init_parallel,
        wrap_for_training,
    )

    ids = _ids(4, batch=2, seq=11)  # 10 inputs: sequence parallelism splits them over TP
    inp, labels = ids[:, :-1], ids[:, 1:]
    hf = _hf_model(hf_dir, torch.float32)
    F.cross_entropy(hf(inp).logits.flatten(0, 1), labels.flatten()).backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    report = {}
    for sp in (False, True):
        par = ParallelConfig(tensor_parallel=2, sequence_parallel=sp)
        init_parallel(par)
        model, cfg = build_model_from_hf(hf_dir, sequence_parallel=sp)
        ddp, _ = wrap_for_training(model, par, OptimizerSettings(lr=LR, clip_grad=0.0))

        def loss_fn(logits_BSV, cfg=cfg):
            mask_vocab_padding_(logits_BSV, cfg)
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits_BSV.float(), labels)
            return loss.mean(), {}

        def step(it, m):
            b = next(it)
            return m(b, torch.arange(b.shape[1]).expand_as(b), None), loss_fn

        ddp.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([inp]), model=[ddp], num_microbatches=1,
            seq_length=inp.shape[1], micro_batch_size=inp.shape[0], forward_only=False,
        )  # fmt: skip
        # Every gradient, in HF's layout (TP shards gathered by the weight rules).
        grads = {n: p.main_grad for n, p in model.named_parameters()}
        got = dict(megatron_to_hf_tensors(grads, cfg))
        assert sorted(got) == sorted(ref)
        worst = {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref}
        name = max(worst, key=worst.get)
        report[f"sp={sp}"] = {"worst": name, "rel_err": worst[name]}
        assert worst[name] < 1e-4, f"SP={sp}: {name} gradient off by {worst[name]:.3g} (rel.)"
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(report, f)


@pytest.mark.dist
def test_gradients_tp2_equal_transformers(qwen3_dirs, tmp_path):
    """Every parameter's gradient at TP=2 (with and without sequence parallelism), gathered to
    HF's layout, equals transformers' (float32, relative 1e-4). Each rank norms only its own
    query/key heads, so the q/k norm gradients are right only once summed over TP: a loss
    curve under Adam hardly shows a missing sum (its first step is scale-free), this does."""
    out = tmp_path / "grads.json"
    run_distributed(_grads_body, 2, qwen3_dirs["f32"], str(out))
    print(json.loads(out.read_text()))


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.slow
def test_cli_round_trip_bf16_saved_at_tp2_exported_at_tp1(tmp_path):
    """The conversion tools on a bf16 Qwen3 (untied): HF -> megatron checkpoint at TP=2 ->
    HF, bit-exact, and transformers computes the same logits from the export."""
    from tests.test_convert import _export_and_check, _run_tool

    src = tiny_hf_model(tmp_path / "hf", ARCH, dtype=torch.bfloat16)
    _run_tool("tools/convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "ck"),
              "--tp", "2")  # fmt: skip
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["layout"]["tensor_parallel"] == 2
    assert manifest["model_config"]["qk_layernorm"] is True
    _export_and_check(src, tmp_path / "ck", tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["model_type"], exported["architectures"]) == ("qwen3", [ARCH])
