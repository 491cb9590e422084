"""The trainer's own passes on SmolLM2-135M (TP=1, one gloo process, fp32, CPU), side by side:

1. the log-prob pass (`compute_logp`, as the old/reference log-probs use it) without the
   entropy (what the trainer runs) against the same pass computing it (what it ran before);
2. one update (`forward_backward`) with the output layer fused into the loss
   (`algorithm.loss.fuse_output_layer=true`) against the plain fused-CE path: peak resident
   memory above the model's, each in a fresh process, same batch.

    .venv/bin/python benchmarks/trainer_passes.py [--rows 16] [--len 256] [--repeats 3]

Prints a JSON line per measurement and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch


def _batch(vocab: int, rows: int, length: int):
    from megatron_agpo.algorithms import advantages
    from megatron_agpo.trainer.batch import build_token_batch_from_lists

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (length // 4,), generator=g).tolist() for _ in range(rows)]
    resp = [
        torch.randint(3, vocab, (length - length // 4,), generator=g).tolist() for _ in range(rows)
    ]
    lps = [(-torch.rand(len(r), generator=g)).tolist() for r in resp]
    rewards = torch.tensor([float(i % 3 == 0) for i in range(rows)], dtype=torch.float64)
    adv = advantages(rewards, 4, "agpo")
    return build_token_batch_from_lists(prompts, resp, lps, adv, pad_id=0)


def _setup():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29611"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.models.smollm2 import smollm2_hf_dir
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training

    pc = ParallelConfig(tensor_parallel=1)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(smollm2_hf_dir())
    ddp, _ = wrap_for_training(model, pc)
    return ddp, mcfg


def child(mode: str, rows: int, length: int, repeats: int) -> dict:
    """One measurement in this (fresh) process."""
    from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
    from megatron_agpo.trainer.step import StepShape, compute_logp, forward_backward

    ddp, mcfg = _setup()
    v = mcfg.vocab_size
    batch = _batch(v, rows, length)
    if mode.startswith("logp"):
        ent = mode == "logp_entropy"
        compute_logp(ddp, batch, StepShape(4), v, with_entropy=ent)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compute_logp(ddp, batch, StepShape(4), v, with_entropy=ent)
            times.append(time.perf_counter() - t0)
        return {"mode": mode, "seconds_min": min(times), "seconds": times}
    fuse = mode == "update_fused"
    cfg = PolicyLossConfig(fuse_output_layer=fuse)
    batch.old_logp = batch.rollout_logp
    batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)
    ddp.zero_grad_buffer()
    base = _rss_mib()  # model, optimizer and batch built
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        # The process's resident size every 2 ms (ru_maxrss would also count the model
        # build's own peak, which can exceed the step's).
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    forward_backward(ddp, batch, cfg, StepShape(rows), v).to_dict()
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"mode": mode, "peak_above_model_mib": peak[0] - base, "seconds": secs}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default="")
    ap.add_argument("--only", default="", help="comma-separated subset of the modes")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.rows, a.len, a.repeats)), flush=True)
        return
    out = {}
    modes = ("logp_entropy", "logp", "update_plain", "update_fused")
    for mode in a.only.split(",") if a.only else modes:
        cmd = [sys.executable, __file__, "--child", mode, "--rows", str(a.rows),
               "--len", str(a.len), "--repeats", str(a.repeats)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
        out[mode] = json.loads(line[7:])
        print(json.dumps(out[mode]), flush=True)
    print(f"\n| SmolLM2-135M, {a.rows} rows x {a.len} tokens | before | now | ratio |")
    print("|---|---|---|---|")
    row = "| {} | {} | {} | {:.2f}x |"
    if "logp" in out and "logp_entropy" in out:
        e, n = out["logp_entropy"]["seconds_min"], out["logp"]["seconds_min"]
        print(row.format(f"log-prob pass (s, min of {a.repeats})", f"{e:.3f} (with entropy)",
                         f"{n:.3f}", e / n))  # fmt: skip
    if "update_plain" in out and "update_fused" in out:
        p, f = (
            out["update_plain"]["peak_above_model_mib"],
            out["update_fused"]["peak_above_model_mib"],
        )
        print(row.format("update peak RSS above the model (MiB)", f"{p:.0f} (fused CE)",
                         f"{f:.0f} (fused output layer)", p / max(f, 1.0)))  # fmt: skip


if __name__ == "__main__":
    main()
