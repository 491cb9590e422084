"""The training step's shape, before and after, side by side in one run (docs/PERFORMANCE.md).

    .venv/bin/python benchmarks/step_shape.py [--baseline cebaf11] [--out benchmarks/results]

1. Host path, ns per token: a receiving rank's rollout-to-batch path on one batch (512 rows,
   256-token prompts, lognormal responses capped at 2,048): the baseline's per-row tuples
   (`broadcast_scored`'s split) and row-by-row `build_token_batch`, against the flat record's
   vectorised build of the same rows.
2. Host syncs per update (device-to-host reads: item / tolist / bool / float / int /
   nonzero / numpy), one update of the tiny model with 1 and with 6 micro-batches, baseline
   and current, each in its own process (the baseline from a git worktree).
3. Packing: padding fraction and training tokens/s of forward+backward, padded vs packed
   micro-batches, on a long-tailed (lognormal) response-length distribution, tiny model.

The baseline is any commit before the GPU-shaped step (its API differs: it is driven
through `_baseline_*` below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.dist_utils and the tiny-model fixtures


def lognormal_lengths(n: int, seed: int, median: float, sigma: float, cap: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * sigma).exp() * median
    return x.clamp(1, cap).long().tolist()


# ----------------------------------------------------------------------------- 1. host path
def host_path(baseline_dir: Path | None, rows=512, prompt=256, cap=2048) -> dict:
    resp = lognormal_lengths(rows, 0, 600.0, 0.9, cap)
    g = torch.Generator().manual_seed(1)
    p_tok = torch.randint(3, 30000, (rows * prompt,), generator=g)
    r_tok = torch.randint(3, 30000, (sum(resp),), generator=g)
    lp = -torch.rand(sum(resp), generator=g)
    adv = torch.randn(rows)
    tokens = rows * prompt + sum(resp)
    out = {"rows": rows, "tokens": tokens}

    from megatron_agpo.trainer.batch import build_token_batch
    from megatron_agpo.trainer.records import ScoredRollouts

    def new():
        zeros = torch.zeros(rows, dtype=torch.float64)
        s = ScoredRollouts(p_tok, torch.full((rows,), prompt), r_tok, torch.tensor(resp), lp,
                           zeros.bool(), zeros, 0, 8)  # fmt: skip
        local = s.select(torch.arange(rows))
        return build_token_batch(local.prompt_tokens, local.prompt_lens.tolist(),
                                 local.response_tokens, local.response_lens.tolist(),
                                 local.rollout_logp, adv, 0)  # fmt: skip

    out["current_s"] = _best(new)
    if baseline_dir is not None:
        sys.path.insert(0, str(baseline_dir))
        for m in [k for k in sys.modules if k.startswith("megatron_agpo")]:
            del sys.modules[m]
        from megatron_agpo.trainer.batch import build_token_batch as old_build
        from megatron_agpo.trainer.records import _split

        def old():
            p_len, r_len = [prompt] * rows, resp
            prompts = _split(p_tok, p_len)
            responses = _split(r_tok, r_len)
            logps = _split(lp, r_len)
            return old_build(prompts, responses, logps, adv, 0)

        out["baseline_s"] = _best(old)
        sys.path.pop(0)
        for m in [k for k in sys.modules if k.startswith("megatron_agpo")]:
            del sys.modules[m]
    for k in ("current_s", "baseline_s"):
        if k in out:
            out[k.replace("_s", "_ns_per_token")] = out[k] / tokens * 1e9
    return out


def _best(fn, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- 2. host syncs
SYNC_SCRIPT = r"""
import json, sys, traceback
import torch
sys.path.insert(0, sys.argv[1])
from tests.dist_utils import run_distributed

HOST_ONLY = ("megatron/core/tensor_parallel/random.py", "torch/optim/", "megatron_agpo/compat.py")
NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "numpy")

def body(rank, world, hf_dir, out_path, baseline):
    from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer import step
    from tests.test_trainer_step import make_batch
    init_parallel(ParallelConfig(tensor_parallel=1))
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, opt = wrap_for_training(model, ParallelConfig(tensor_parallel=1))
    v, cfg = mcfg.vocab_size, PolicyLossConfig()
    batch = make_batch(v)
    batch.old_logp = batch.rollout_logp.clone()
    batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)
    calls = {"n": 0, "host_only": 0}
    for name in NAMES:
        orig = getattr(torch.Tensor, name)
        def w(t, *a, _o=orig, **k):
            where = traceback.extract_stack(limit=2)[0].filename
            calls["host_only" if any(h in where for h in HOST_ONLY) else "n"] += 1
            return _o(t, *a, **k)
        setattr(torch.Tensor, name, w)
    res = {}
    for label, rows in (("warmup", 12), ("1 micro-batch", 12), ("6 micro-batches", 2)):
        ddp.zero_grad_buffer(); opt.zero_grad()
        calls.update(n=0, host_only=0)
        if baseline:
            m = step.forward_backward(ddp, batch, cfg, rows, v, 0)
        else:
            m = step.forward_backward(ddp, batch, cfg, step.StepShape(rows, 0), v).to_dict()
        step.grads_are_finite(ddp)
        opt.step()
        res[label] = dict(calls)
    json.dump(res, open(out_path, "w"))

if __name__ == "__main__":
    try:
        from tests.tiny_models import tiny_hf_model
    except ImportError:  # a baseline from before the builder moved out of the package
        from megatron_agpo.models.pretrained import tiny_hf_model
    import tempfile
    hf = str(tiny_hf_model(tempfile.mkdtemp()))
    run_distributed(body, 1, hf, sys.argv[2], sys.argv[3] == "1")
"""


def host_syncs(code_dir: Path, baseline: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        script, out = Path(d) / "syncs.py", Path(d) / "out.json"
        script.write_text(SYNC_SCRIPT)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code_dir))
        subprocess.run([sys.executable, str(script), str(code_dir), str(out), str(int(baseline))],
                       check=True, env=env, cwd=code_dir, capture_output=True)  # fmt: skip
        res = json.loads(out.read_text())
    res.pop("warmup")
    return res


# ----------------------------------------------------------------------------- 3. packing
def packing(rows=64, budget=2048, repeats=3) -> dict:
    """Forward+backward of one mini-batch, padded then packed micro-batches, in one gloo world
    of one rank (the tiny Llama widened: hidden 256, vocabulary 16,384, context 4,096)."""
    from tests.dist_utils import run_distributed
    from tests.tiny_models import tiny_hf_model

    d = Path(tempfile.mkdtemp())
    hf = tiny_hf_model(d / "hf", hidden_size=256, intermediate_size=512, vocab_size=16384,
                       max_position_embeddings=4096)  # fmt: skip
    run_distributed(_packing_body, 1, str(hf), rows, budget, repeats, str(d / "packing.json"))
    return json.loads((d / "packing.json").read_text())


def _packing_body(rank, world, hf_dir, rows, budget, repeats, out_path):
    from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.batch import build_token_batch_from_lists
    from megatron_agpo.trainer.step import StepShape, forward_backward

    init_parallel(ParallelConfig(tensor_parallel=1))
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, _ = wrap_for_training(model, ParallelConfig(tensor_parallel=1))
    v = mcfg.vocab_size
    g = torch.Generator().manual_seed(0)
    resp = lognormal_lengths(rows, 2, 120.0, 0.9, 1024)
    prompts = [torch.randint(3, v, (64,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(3, v, (n,), generator=g).tolist() for n in resp]
    lps = [[-1.0] * n for n in resp]
    batch = build_token_batch_from_lists(prompts, responses, lps, torch.randn(rows), 0)
    batch.old_logp = batch.rollout_logp.clone()
    cfg = PolicyLossConfig()
    batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)
    real = sum(batch.lengths.seq)
    res = {"rows": rows, "token_budget": budget, "real_tokens": real,
           "response_len_median": sorted(resp)[rows // 2],
           "response_len_max": max(resp)}  # fmt: skip
    for label, packed in (("padded", False), ("packed", True)):
        shape = StepShape(rows, budget, packed)
        micro = batch.micro_batches(rows, budget, 1, packed)
        computed = sum(m.num_tokens for m in micro)
        forward_backward(ddp, batch, cfg, shape, v)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            ddp.zero_grad_buffer()
            t0 = time.perf_counter()
            forward_backward(ddp, batch, cfg, shape, v).to_dict()
            best = min(best, time.perf_counter() - t0)
        res[label] = {"micro_batches": len(micro), "positions_computed": computed,
                      "padding_fraction": 1 - real / computed, "seconds": best,
                      "tokens_per_s": real / best}  # fmt: skip
    res["speedup"] = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
    with open(out_path, "w") as f:
        json.dump(res, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="cebaf11", help="a commit before the change")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    torch.set_num_threads(1)
    worktree = Path(tempfile.mkdtemp()) / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), a.baseline],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    try:
        result = {
            "command": f"python benchmarks/step_shape.py --baseline {a.baseline}",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, 1 thread",
            "host_path": host_path(worktree),
            "host_syncs": {
                "baseline": host_syncs(worktree, True),
                "current": host_syncs(REPO, False),
            },  # fmt: skip
            "packing": packing(),
        }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO)
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_shape.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
