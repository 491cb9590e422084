"""One training step (forward + backward) tokens/s: megatron GPTModel at TP=1 vs transformers'
model on the same SmolLM2-135M weights and batch, side by side in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py [--batch 4 --seq 256 --iters 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.nn.functional as F


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", WORLD_SIZE="1")
    from megatron.core import tensor_parallel
    from transformers import AutoModelForCausalLM

    from megatron_agpo.models import build_model_from_hf, mask_vocab_padding_
    from megatron_agpo.models.pretrained import smollm2_hf_dir
    from megatron_agpo.parallel import ParallelConfig, destroy_parallel, init_parallel

    hf_dir = smollm2_hf_dir()
    init_parallel(ParallelConfig())
    mg, cfg = build_model_from_hf(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    inp, lab = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(args.seq).expand_as(inp)

    def mg_step():
        mg.zero_grad(set_to_none=True)
        logits = mask_vocab_padding_(mg(inp, pos, None), cfg)
        tensor_parallel.vocab_parallel_cross_entropy(logits.float(), lab).mean().backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(inp).logits
        F.cross_entropy(logits.flatten(0, 1), lab.flatten()).backward()

    tokens = args.batch * args.seq
    t_mg = _time(mg_step, args.iters)
    t_hf = _time(hf_step, args.iters)
    threads = torch.get_num_threads()
    print(
        f"SmolLM2-135M fp32, batch {args.batch} x seq {args.seq}, torch threads {threads}, "
        f"forward+backward, mean of {args.iters} after 1 warm-up"
    )
    print(f"megatron TP=1  {t_mg:6.2f} s/step  {tokens / t_mg:8.1f} tokens/s")
    print(f"transformers   {t_hf:6.2f} s/step  {tokens / t_hf:8.1f} tokens/s")
    destroy_parallel()


if __name__ == "__main__":
    main()
