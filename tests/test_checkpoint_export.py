"""Export of a trained run: the documented command on a run folder, logits of the export
(transformers) against the trainer's Megatron model loaded from the same checkpoint, and
pass@k evaluation of the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parent.parent
IDS = [[3, 17, 25, 9, 40, 12, 33, 7, 21, 5, 14, 28]]


def _megatron_logits(rank, world, ckpt, out):
    from megatron_agpo.models import build_model, forward_logits
    from megatron_agpo.models.checkpoint import config_from_checkpoint, load_checkpoint
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg)
    load_checkpoint(model, ckpt)
    model.eval()
    with torch.no_grad():
        logits = forward_logits(model, torch.tensor(IDS))[..., : cfg.vocab_size]
    torch.save(logits.clone(), out)


def _hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_trained_run_exports_and_evaluates(tp2_run, tmp_path):
    """The shared TP=2 run (tests/conftest.py; 4 steps, checkpoints at steps 2 and 4): the
    tool exports its latest checkpoint."""
    run, _ = tp2_run
    ckpt = run / "checkpoints" / "step_0000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["kind"] == "run" and manifest["layout"]["tensor_parallel"] == 2

    out = tmp_path / "hf_out"
    res = subprocess.run(
        [sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(run), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "step_0000004" in res.stdout

    run_distributed(_megatron_logits, 1, str(ckpt), str(tmp_path / "meg.pt"))
    meg = torch.load(tmp_path / "meg.pt", weights_only=True)
    exported = _hf_logits(out)
    start = _hf_logits(manifest["source"])
    # The export computes what the trainer's model computes (TP=2 training, loaded at TP=1)...
    torch.testing.assert_close(exported, meg, rtol=1e-5, atol=1e-5)
    # ... and it is the trained policy, not the one training started from.
    assert (exported - start).abs().max() > 1e-3

    from transformers import AutoTokenizer

    text = "12+7="
    a = AutoTokenizer.from_pretrained(out)(text).input_ids
    b = AutoTokenizer.from_pretrained(manifest["source"])(text).input_ids
    assert a == b

    data = tmp_path / "bench.jsonl"
    rows = [
        {"id": "a", "problem": "3+4=", "answer": "7"},
        {"id": "b", "problem": "9+1=", "answer": "10"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable, "tools/eval_passk.py", "--model", str(out), "--data", f"math500={data}",
        "--n", "2", "--max-new-tokens", "8", "--no-chat-template", "--instruction", "",
        "--max-model-len", "64", "--no-plot", "--out", str(tmp_path / "eval"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results, results
