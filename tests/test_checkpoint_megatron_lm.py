"""A Megatron-LM training checkpoint (torch_dist: latest_checkpointed_iteration.txt,
iter_NNNNNNN/ with the model, saved arguments and more), written here by megatron-core's dist
checkpointing, exports to HF with the config read from its arguments."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_agpo.models import HFWeights
from tests.dist_utils import run_distributed
from tests.tiny_models import tiny_hf_model

REPO = Path(__file__).resolve().parent.parent


def _write_megatron_lm(rank, world, hf, root):
    from megatron.core import dist_checkpointing

    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    model, _ = build_model_from_hf(hf)
    args = argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16, padded_vocab_size=128,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
        max_position_embeddings=128, rotary_base=500000, norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True, swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", add_qkv_bias=False, bf16=False, fp16=False,
    )  # fmt: skip
    it = Path(root) / "iter_0000010"
    it.mkdir(parents=True)
    # Megatron-LM's layout: the model's sharded state beside the run's other state.
    dist_checkpointing.save(
        {"model": model.sharded_state_dict(), "args": args, "iteration": 10,
         "checkpoint_version": 3.0},
        str(it),
    )  # fmt: skip
    (Path(root) / "latest_checkpointed_iteration.txt").write_text("10")


@pytest.mark.e2e
@pytest.mark.dist  # one gloo process each
def test_megatron_lm_checkpoint_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    src = tiny_hf_model(tmp_path / "hf", rope_parameters=rope)
    run_distributed(_write_megatron_lm, 1, str(src), str(tmp_path / "mlm"))
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "mlm"),
         "--tokenizer", str(src), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = HFWeights(src), HFWeights(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a:
        assert torch.equal(a.get(name), b.get(name)), name
    ids = torch.tensor([[3, 17, 25, 9, 40, 12]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the config came through too
    assert (out / "tokenizer.json").is_file()
