"""FP8 and rollout-precision settings, on CPU: the mapping onto megatron-core's
TransformerConfig (checked against megatron's own dataclass), the one-line refusals where
Transformer Engine or a capable GPU is missing, and when truncated importance sampling must
be on."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_agpo.backends import Backends
from megatron_agpo.models import ModelConfig
from megatron_agpo.models.build import fp8_kwargs, uses_transformer_engine
from megatron_agpo.models.precision import (
    FP8UnavailableError,
    check_fp8_available,
    fp8_unavailable_reason,
    model_overrides,
    needs_tis,
    resolve_tis_cap,
)
from megatron_agpo.registry import require_valid
from megatron_agpo.rollout.config import RolloutConfig
from megatron_agpo.trainer.config import ModelSection, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = Backends(cuda=False, transformer_engine=False, apex=False, vllm=False)
GPU_NO_TE = Backends(cuda=True, transformer_engine=False, apex=False, vllm=False)
GPU_TE = Backends(cuda=True, transformer_engine=True, apex=False, vllm=False)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=256, **kw)  # fmt: skip


def _megatron_config(**extra):
    """megatron-core's own TransformerConfig for a 4-layer model with `extra` on top: its
    __post_init__ is the independent judge of names and combinations."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **extra)  # fmt: skip


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
@pytest.mark.parametrize("gather", [False, True])
def test_fp8_settings_map_onto_megatron_fields(fmt, recipe, gather):
    first_last = recipe != "delayed"  # megatron refuses first/last BF16 with delayed scaling
    cfg = _cfg(fp8=fmt, fp8_recipe=recipe, fp8_param_gather=gather,
               first_last_layers_bf16=first_last, fp8_amax_history_len=16)  # fmt: skip
    cfg.validate()
    kw = fp8_kwargs(cfg)
    expected = {"fp8": fmt, "fp8_recipe": recipe, "fp8_param": gather}
    if recipe == "delayed":
        expected |= {"fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max"}
    if first_last:
        expected |= {"first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 1,
                     "num_layers_at_end_in_bf16": 1}  # fmt: skip
    assert kw == expected
    # Every key is a real TransformerConfig field and megatron accepts the combination.
    names = {f.name for f in dataclasses.fields(_megatron_config())}
    assert set(kw) <= names
    tc = _megatron_config(**kw)
    for k, v in expected.items():
        assert getattr(tc, k) == v, k


def test_fp8_off_adds_nothing_and_keeps_local_layers():
    for off in (None, "none", ""):
        cfg = _cfg(fp8=off)
        assert cfg.fp8 is None
        assert fp8_kwargs(cfg) == {}
        assert not uses_transformer_engine(cfg, transformer_engine=False)
    assert uses_transformer_engine(_cfg(fp8="hybrid"), transformer_engine=False)
    assert uses_transformer_engine(_cfg(), transformer_engine=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(fp8="e5m2"), "fp8='e5m2'"),
        (dict(fp8="hybrid", fp8_recipe="fast"), "fp8_recipe='fast'"),
        (dict(fp8_param_gather=True), "fp8_param_gather=true needs"),
        (dict(first_last_layers_bf16=True), "first_last_layers_bf16=true needs"),
        (dict(fp8="hybrid", first_last_layers_bf16=True), "fp8_recipe=delayed"),
        (
            dict(
                fp8="hybrid",
                fp8_recipe="tensorwise",
                first_last_layers_bf16=True,
                num_layers_at_end_in_bf16=5,
            ),
            "num_layers_at_end_in_bf16=5",
        ),  # fmt: skip
    ],
)
def test_model_config_refuses_bad_fp8_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw).validate()


def test_delayed_with_first_last_bf16_is_refused_by_megatron_too():
    # Our refusal mirrors megatron's: if megatron ever accepts it, ours should be dropped.
    with pytest.raises(ValueError, match="Delayed scaling"):
        _megatron_config(fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True)


def test_unavailable_reasons_name_transformer_engine():
    assert fp8_unavailable_reason(None, "delayed", NO_GPU, None) is None
    for backends in (NO_GPU, GPU_NO_TE):
        msg = fp8_unavailable_reason("hybrid", "delayed", backends, (9, 0), key="model.fp8")
        assert "Transformer Engine" in msg and "model.fp8=none" in msg and "\n" not in msg
    assert "CUDA is not available" in fp8_unavailable_reason("e4m3", "delayed", NO_GPU, None)
    # Capability per recipe: A100 (8.0) has no FP8; H100 (9.0) has all but MXFP8.
    assert "8.9 or newer" in fp8_unavailable_reason("hybrid", "delayed", GPU_TE, (8, 0))
    assert fp8_unavailable_reason("hybrid", "delayed", GPU_TE, (8, 9)) is None
    assert fp8_unavailable_reason("hybrid", "blockwise", GPU_TE, (9, 0)) is None
    assert "10.0 or newer" in fp8_unavailable_reason("hybrid", "mxfp8", GPU_TE, (9, 0))
    assert fp8_unavailable_reason("hybrid", "mxfp8", GPU_TE, (10, 0)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: FP8 may well be available")
def test_fp8_here_is_refused_in_one_line():
    with pytest.raises(FP8UnavailableError, match="Transformer Engine") as e:
        check_fp8_available("hybrid")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    check_fp8_available("none")  # off: nothing to check


def test_train_config_reports_fp8_problems_by_key():
    cfg = TrainConfig()
    assert cfg.model.precision_problems() == []
    cfg.model.fp8 = "hybrid"
    (line,) = cfg.model.precision_problems()
    assert line.startswith("model.fp8=hybrid needs NVIDIA Transformer Engine")
    with pytest.raises(ValueError, match="Transformer Engine"):
        cfg.validate()
    section = ModelSection(fp8_param_gather=True)
    assert section.precision_problems() == [
        "model.fp8_param_gather=true needs model.fp8=e4m3 or hybrid"
    ]
    section = ModelSection(fp8="e5m2")
    assert section.precision_problems()[0].startswith("model.fp8='e5m2'")


@pytest.mark.e2e
def test_agpo_train_fp8_on_cpu_exits_with_one_line():
    res = subprocess.run(
        [sys.executable, "-m", "megatron_agpo.train", "model.fp8=hybrid"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Transformer Engine" in out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if "Transformer Engine" in ln]
    assert len(lines) == 1


def test_model_overrides_reach_model_config():
    section = ModelSection(params_dtype="bfloat16", fp8="e4m3", fp8_recipe="tensorwise",
                           fp8_param_gather=True, first_last_layers_bf16=True)  # fmt: skip
    cfg = _cfg(**model_overrides(section))
    assert (cfg.params_dtype, cfg.fp8, cfg.fp8_recipe) == ("bfloat16", "e4m3", "tensorwise")
    assert cfg.fp8_param_gather and cfg.first_last_layers_bf16
    assert _cfg(**model_overrides(ModelSection())).fp8 is None


@pytest.mark.parametrize(
    "params_dtype, fp8, engine_dtype, quantization, expected",
    [
        ("float32", "none", "float32", "", False),  # the CPU default: fp32 on both sides
        ("bfloat16", "none", "auto", "", False),  # bf16 checkpoint served as bf16
        ("bfloat16", "none", "bfloat16", "", False),
        ("float32", "none", "auto", "", True),  # vLLM downcasts fp32 checkpoints under auto
        ("float32", "none", "bfloat16", "", True),
        ("bfloat16", "none", "auto", "fp8", True),  # FP8 rollouts, BF16 trainer
        ("bfloat16", "hybrid", "auto", "", True),  # FP8 trainer, BF16 rollouts
        ("bfloat16", "hybrid", "auto", "fp8", True),  # FP8 on both, different scalings
    ],
)
def test_needs_tis(params_dtype, fp8, engine_dtype, quantization, expected):
    model = ModelSection(params_dtype=params_dtype, fp8=fp8)
    engine = RolloutConfig(dtype=engine_dtype, quantization=quantization)
    assert needs_tis(model, engine) is expected


def test_resolve_tis_cap():
    assert resolve_tis_cap(None, required=True) == 2.0
    assert resolve_tis_cap(None, required=False) is None
    assert resolve_tis_cap(5.0, required=True) == 5.0
    assert resolve_tis_cap(5.0, required=False) == 5.0


def test_rollout_quantization_is_checked_and_reaches_vllm(monkeypatch):
    with pytest.raises(ValueError, match="quantization='int4'"):
        require_valid(RolloutConfig(quantization="int4"), "rollout.engine.")
    seen = []
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: seen.append(kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # restored after the test
    from megatron_agpo.rollout.vllm_engine import build_llm

    build_llm(RolloutConfig(model_path="/m", quantization="fp8"))
    build_llm(RolloutConfig(model_path="/m"))
    assert [kw["quantization"] for kw in seen] == ["fp8", None]


def test_trainer_section_hands_fp8_fields_to_the_model_builder():
    section = ModelSection(fp8="hybrid", fp8_recipe="blockwise", first_last_layers_bf16=True)
    over = section.megatron_overrides()
    assert over == {"fp8": "hybrid", "fp8_recipe": "blockwise", "fp8_param_gather": False,
                    "first_last_layers_bf16": True}  # fmt: skip
    assert _cfg(**over).fp8 == "hybrid"
    assert ModelSection().megatron_overrides()["fp8"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: FP8 rollouts may work")
def test_fp8_rollouts_on_cpu_are_refused_by_key():
    cfg = TrainConfig()
    cfg.rollout.engine.quantization = "fp8"
    problems = cfg.problems()
    assert any(p.startswith("rollout.engine.quantization=fp8 needs vLLM on a CUDA GPU")
               for p in problems), problems  # fmt: skip
    cfg.rollout.engine.quantization = ""
    assert not any("quantization" in p for p in cfg.problems())
