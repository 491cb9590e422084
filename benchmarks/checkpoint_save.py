"""Save time of a run checkpoint (model + optimizer + RNG + manifest) of SmolLM2-135M, one
process (TP=1), CPU: total, and the part spent hashing/fsyncing for the manifest."""

import json
import os
import shutil
import time
from pathlib import Path

import torch

if __name__ == "__main__":
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29651", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_agpo.models import build_model_from_hf, forward_logits
    from megatron_agpo.models import checkpoint as fmt
    from megatron_agpo.models.smollm2 import smollm2_hf_dir
    from megatron_agpo.parallel import (
        OptimizerSettings,
        ParallelConfig,
        init_parallel,
        wrap_for_training,
    )
    from megatron_agpo.trainer import checkpoint as ck

    pc = ParallelConfig()
    init_parallel(pc)
    hf = smollm2_hf_dir()
    model, mcfg = build_model_from_hf(hf)
    model, opt = wrap_for_training(model, pc, OptimizerSettings(lr=1e-5))
    ids = torch.randint(3, 1000, (1, 32))
    model.zero_grad_buffer()
    opt.zero_grad()
    forward_logits(model, ids).float().pow(2).mean().backward()
    finalize_model_grads([model])
    opt.step()
    t0 = time.perf_counter()
    model.zero_grad_buffer()
    opt.zero_grad()
    forward_logits(model, ids).float().pow(2).mean().backward()
    finalize_model_grads([model])
    opt.step()
    step_s = time.perf_counter() - t0
    root = Path("/tmp/ck/bench_ckpt")
    shutil.rmtree(root, ignore_errors=True)
    real_finalize = fmt.finalize
    spent = []

    def timed_finalize(*a, **k):
        t = time.perf_counter()
        r = real_finalize(*a, **k)
        spent.append(time.perf_counter() - t)
        return r

    ck.finalize = timed_finalize
    res = []
    for i in (1, 2):
        t = time.perf_counter()
        path = ck.save(root, i, model, opt, {"step": i}, keep_last=2, mcfg=mcfg, hf_dir=hf)
        res.append(time.perf_counter() - t)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    t = time.perf_counter()
    fmt.verify(path)
    verify_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "save_s": res,
                "manifest_hash_fsync_s": spent,
                "verify_s": verify_s,
                "checkpoint_bytes": size,
                "one_update_s_seq32": step_s,
            }
        )
    )
    shutil.rmtree(root, ignore_errors=True)
