"""Memory and time of the AGPO loss: naive vs megatron CE + surrogate vs fused vs fused+output.

    .venv/bin/python benchmarks/fused_loss.py            # T=2048, V=151,936, TP=1 and TP=2
    python benchmarks/fused_loss.py --device cuda --json out.json   # on a GPU (NCCL)

Every (method, TP) pair runs in a fresh process (TP=2: two gloo ranks), so one method's
allocator state cannot flatter another's. Extra peak memory is the rise of the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up step) above its RSS once the
inputs exist. Inputs are what the step is given:

- logits methods: vocab-parallel logits [T, V/TP] fp32, targets, advantages, old log-probs;
  the step computes the per-token loss, its token-mean, and d(loss)/d(logits);
- output-layer methods: hidden [T, H], the output weight [V/TP, H] and a preallocated weight
  gradient buffer (megatron's DDP main_grad); the step computes d(loss)/d(hidden) and
  accumulates d(loss)/dW. "megatron CE + output" is the unfused baseline for "fused with
  output layer": logits = hidden @ W^T, then megatron's CE, then the surrogate.

Time is the median over --repeats steps after the warm-up. On a CPU, ratios are what carry
over; absolute times hold only for this machine.

On CUDA (--device cuda, the default where a GPU is visible) every tensor lives on the GPU,
ranks talk over NCCL (one GPU per rank: TP=2 needs two), times are taken after
`torch.cuda.synchronize()`, and extra peak memory is the rise of
`torch.cuda.max_memory_allocated()` (reset after the warm-up) above the memory allocated once
the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ["naive", "megatron_ce", "fused", "fused_noent", "megatron_ce_output", "fused_output"]
LABELS = {
    "naive": "naive (gather V, fp32 log_softmax, surrogate)",
    "megatron_ce": "megatron vocab_parallel_cross_entropy + surrogate",
    "fused": "fused, chunked, in place (+entropy)",
    "fused_noent": "fused, chunked, in place (no entropy)",
    "megatron_ce_output": "output layer matmul + megatron CE + surrogate",
    "fused_output": "fused with output layer (+entropy)",
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_agpo.algorithms import PolicyLossConfig, aggregate, token_loss
    from megatron_agpo.ops import (
        fused_output_layer_agpo_loss,
        fused_vocab_parallel_agpo_loss,
        naive_agpo_loss,
    )

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    torch.manual_seed(1234 + rank)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    t, vl, h = args.tokens, args.vocab // tp, args.hidden
    cfg = PolicyLossConfig()
    g = torch.Generator().manual_seed(0)  # identical targets/advantages on every rank
    target = torch.randint(0, args.vocab, (t,), generator=g).to(dev)
    adv = torch.where(torch.rand(t, generator=g) < 0.5, -1.0, 0.3).to(dev)
    old = (-12.0 + 0.1 * torch.randn(t, generator=g)).to(dev)
    mask = torch.ones(1, t, device=dev)

    if args.method.endswith("_output"):
        hidden = (0.02 * torch.randn(t, h, device=dev)).requires_grad_()
        weight = (0.02 * torch.randn(vl, h, device=dev)).requires_grad_()
        weight.main_grad = torch.zeros(vl, h, device=dev)
        weight.grad = weight.main_grad  # autograd accumulates into it in place
    else:
        logits = (2.0 * torch.randn(t, vl, device=dev)).requires_grad_()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        if args.method == "fused_output":
            out = fused_output_layer_agpo_loss(
                hidden,
                weight,
                target,
                adv,
                cfg,
                old_logp=old,
                tp_group=group,
                chunk_size=args.chunk or None,
            )
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
            return torch.autograd.grad(loss, [hidden])
        if args.method == "megatron_ce_output":
            logp = -vocab_parallel_cross_entropy(hidden @ weight.t(), target)
            loss = aggregate(token_loss(logp, old, adv, cfg).loss.view(1, -1), mask, "token-mean")
            loss.backward(inputs=[hidden, weight])  # weight's grad accumulates in place
            return (hidden.grad,)
        if args.method == "naive":
            out = naive_agpo_loss(logits, target, adv, cfg, old_logp=old, tp_group=group)
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
        elif args.method == "megatron_ce":
            # Megatron's CE overwrites its input with the softmax, as the fused path does.
            logp = -vocab_parallel_cross_entropy(logits, target)
            loss = aggregate(token_loss(logp, old, adv, cfg).loss.view(1, -1), mask, "token-mean")
        else:
            out = fused_vocab_parallel_agpo_loss(
                logits,
                target,
                adv,
                cfg,
                old_logp=old,
                tp_group=group,
                chunk_size=args.chunk or None,
                inplace=True,
                compute_entropy=args.method == "fused",
            )
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
        return torch.autograd.grad(loss, [logits])

    grads = step()  # warm-up (allocator, thread pools)
    del grads
    if args.method.endswith("_output"):
        hidden.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS") * 1024
    grads = step()
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    extra_gb = (peak - base) / 1e9
    del grads
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        grads = step()
        sync()
        del grads
        if args.method.endswith("_output"):
            hidden.grad = None
        times.append(time.perf_counter() - t0)
    peaks = [None] * tp
    dist.all_gather_object(peaks, extra_gb)
    if rank == 0:
        times.sort()
        print(
            json.dumps(
                {
                    "method": args.method,
                    "tp": tp,
                    "device": args.device,
                    "extra_gb": max(peaks),
                    "time_s": times[len(times) // 2],
                }
            ),
            flush=True,
        )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def mem_ratio(naive_gb: float, gb: float) -> str:
    # Below 1 MB (the resolution that matters here) the ratio is a lower bound.
    return f">{naive_gb / 1e-3:.0f}x" if gb < 1e-3 else f"{naive_gb / gb:.1f}x"


def run_one(method: str, tp: int, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={tp}",
        __file__,
        "--worker",
        "--method",
        method,
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--chunk",
        str(args.chunk),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // tp)))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{method} TP={tp} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536, help="H for the output-layer variant")
    p.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="tokens per chunk in the fused paths (0: the library default, CHUNK_BYTES)",
    )
    p.add_argument(
        "--tp",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 2 (CUDA: 1 2 with two GPUs, else 1)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", default="", help="also write every row and ratio to this file")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tp is None:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        args.tp = [1] if args.device == "cuda" and gpus < 2 else [1, 2]
    where = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"# fused AGPO loss benchmark, {stamp}, {where}; T={args.tokens} V={args.vocab} "
        f"H={args.hidden} chunk={args.chunk} fp32, median of {args.repeats}"
    )
    print(
        "| TP | method | extra peak (GB) | time (s) | memory vs naive | time vs unfused megatron |"
    )
    print("|---|---|---|---|---|---|")
    ratios = []
    all_rows = []
    for tp in args.tp:
        rows = {m: run_one(m, tp, args) for m in args.methods}
        all_rows += list(rows.values())
        naive = rows.get("naive")
        for m, r in rows.items():
            meg = rows.get("megatron_ce_output" if m.endswith("_output") else "megatron_ce")
            mem = f"{mem_ratio(naive['extra_gb'], r['extra_gb'])} less" if naive else "-"
            tim = f"{r['time_s'] / meg['time_s']:.2f}x" if meg else "-"
            print(
                f"| {tp} | {LABELS[m]} | {r['extra_gb']:.3f} | {r['time_s']:.2f} | {mem} | {tim} |",
                flush=True,
            )
        for m, base in (
            ("fused", "megatron_ce"),
            ("fused_noent", "megatron_ce"),
            ("fused_output", "megatron_ce_output"),
        ):
            if naive and m in rows and base in rows:
                ratios.append(
                    f"TP={tp} {m}: {mem_ratio(naive['extra_gb'], rows[m]['extra_gb'])} "
                    f"less memory than naive, {rows[m]['time_s'] / rows[base]['time_s']:.2f}x "
                    f"the time of {base}"
                )
    print("ratios: " + "; ".join(ratios))
    if args.json:
        record = dict(benchmark="fused_loss", date=stamp, device=args.device, where=where,
                      tokens=args.tokens, vocab=args.vocab, hidden=args.hidden,
                      repeats=args.repeats, rows=all_rows, ratios=ratios)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
