"""Memory and time of the AGPO loss, the fused kernel beside megatron's CE and the peers.

    .venv/bin/python benchmarks/fused_loss.py            # T=2048, V=151,936, TP=1 and 2, fp32
    .venv/bin/python benchmarks/fused_loss.py --dtype fp32 bf16 --preset qwen2.5-1.5b
    .venv/bin/python benchmarks/fused_loss.py --plan     # CUDA chunking and the GEMM limit only
    python benchmarks/fused_loss.py --device cuda --json out.json   # on a GPU (NCCL)

Every (method, TP, dtype) runs in a fresh process (TP=2: two gloo ranks), so one method's
allocator state cannot flatter another's. Extra peak memory is the rise of the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up step) above its RSS once the
inputs exist. Inputs are what the step is given:

- logits methods: vocab-parallel logits [T, V/TP] (fp32 or bf16), targets, advantages, old
  log-probs; the step computes the per-token loss, its token-mean, and d(loss)/d(logits);
- output-layer methods: hidden [T, H], the output weight [V/TP, H] and a preallocated float32
  weight-gradient buffer (megatron's DDP main_grad); the step computes d(loss)/d(hidden) and
  accumulates d(loss)/dW. "megatron CE + output" is the unfused baseline for "fused with
  output layer": logits = hidden @ W^T, then megatron's CE, then the surrogate.

Peers, each a method where it imports (else its row says why not): megatron-core's
`vocab_parallel_cross_entropy` (always); Liger-Kernel's chunked `LigerFusedLinearGRPOLoss`
(pure PyTorch, TP=1, its own GRPO surrogate: DAPO loss, clip-higher, no dual clip, compiled
off on the CPU); Liger's Triton fused linear cross entropy with reduction="none" and Apple's
Cut Cross-Entropy (`linear_cross_entropy(..., reduction="none")`), CUDA only, each followed by
the AGPO surrogate on [T] vectors. Neither peer is in the default set-up: install them (and
Triton, about 1 GB) by hand, e.g. `pip install liger-kernel cut-cross-entropy`, or put the
wheels' contents on PYTHONPATH.

The limit printed with the output-layer rows is computed, not measured: the unfused output
layer's three GEMMs (logits, d hidden, d weight: 3 x 2 T (V/TP) H FLOPs) at --peak-tflops
(default 989, an H100 SXM's dense bf16). The fused output layer runs four (the logits are
recomputed in the backward), so its own floor is 4/3 of the limit.

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

METHODS = [
    "naive", "megatron_ce", "fused", "fused_noent",
    "megatron_ce_output", "fused_output", "liger_grpo_output", "liger_flce_output", "cce_output",
]  # fmt: skip
DEFAULT_METHODS = METHODS
LABELS = {
    "naive": "naive (gather V, fp32 log_softmax, surrogate)",
    "megatron_ce": "megatron vocab_parallel_cross_entropy + surrogate",
    "fused": "fused, chunked, in place (+entropy)",
    "fused_noent": "fused, chunked, in place (no entropy)",
    "megatron_ce_output": "output layer matmul + megatron CE + surrogate",
    "fused_output": "fused with output layer (+entropy)",
    "liger_grpo_output": "Liger chunked LigerFusedLinearGRPOLoss (its surrogate)",
    "liger_flce_output": "Liger fused linear CE (Triton, reduction=none) + surrogate",
    "cce_output": "Cut Cross-Entropy (reduction=none) + surrogate",
}
PRESETS = {  # (vocabulary, hidden): the realistic shapes
    "qwen2.5-1.5b": (151936, 1536),
    "qwen2.5-7b": (151936, 3584),
    "llama3-70b": (128256, 8192),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def gemm_limit_ms(tokens: int, v_local: int, hidden: int, peak_tflops: float) -> float:
    """The output layer's three GEMMs (logits, d hidden, d weight) at the bf16 peak, in ms."""
    return 3 * 2 * tokens * v_local * hidden / (peak_tflops * 1e12) * 1e3


def count_ops(tokens: int, vocab: int, hidden: int, chunk: int, vocab_chunk: int) -> dict:
    """Aten ops (about one kernel launch each on CUDA) of one forward and backward of each
    fused function, TP=1, run on the meta device (shapes only: nothing is computed)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_agpo.algorithms import PolicyLossConfig
    from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    meta = torch.device("meta")
    cfg = PolicyLossConfig()
    target = torch.zeros(tokens, dtype=torch.long, device=meta)
    adv, old = torch.zeros(tokens, device=meta), torch.zeros(tokens, device=meta)
    counts = {}
    z = torch.empty(tokens, vocab, dtype=torch.bfloat16, device=meta, requires_grad=True)
    with Count():
        out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, old_logp=old, chunk_size=chunk,
                                             inplace=True, compute_entropy=False)  # fmt: skip
        out.loss.sum().backward()
    counts["logits"], Count.n = Count.n, 0
    h = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=meta, requires_grad=True)
    w = torch.empty(vocab, hidden, dtype=torch.bfloat16, device=meta, requires_grad=True)
    with Count():
        out = fused_output_layer_agpo_loss(h, w, target, adv, cfg, old_logp=old,
                                           chunk_size=chunk, vocab_chunk_size=vocab_chunk,
                                           compute_entropy=False)  # fmt: skip
        out.loss.sum().backward()
    counts["output"] = Count.n
    return counts


def plan(tokens: int, vocab: int, hidden: int, tp: int, peak_tflops: float) -> str:
    """What the fused loss does on CUDA at this shape, counted on the host (nothing runs)."""
    import torch

    from megatron_agpo.ops.fused_agpo_loss import chunk_bytes, chunk_tokens

    cuda = torch.device("cuda")
    vl = -(-vocab // tp)
    c_tok = chunk_tokens(None, vl, cuda)
    c_voc = min(chunk_tokens(None, tokens, cuda), vl)
    fwd, bwd = -(-tokens // c_tok), -(-vl // c_voc)
    ws = chunk_bytes(cuda) / 2**30
    lim = gemm_limit_ms(tokens, vl, hidden, peak_tflops)
    ops = count_ops(tokens, vl, hidden, c_tok, c_voc)
    return (
        f"T={tokens} V={vocab} H={hidden} TP={tp}: logits path {fwd} token chunk(s) of "
        f"{min(c_tok, tokens)}, 2 TP collectives per forward, {ops['logits']} aten ops per "
        f"forward+backward; output layer: forward {fwd} token chunk(s), backward {bwd} "
        f"vocabulary chunk(s) of {c_voc} (main_grad written once per call), 3 TP collectives "
        f"per call, {ops['output']} aten ops; float32 workspaces <= {ws:.0f} GiB each; GEMM "
        f"limit (3 GEMMs at {peak_tflops:.0f} TFLOP/s) {lim:.1f} ms, fused floor (4 GEMMs) "
        f"{4 / 3 * lim:.1f} ms"
    )


def _peer_unavailable(method: str, tp: int, cuda: bool) -> str | None:
    """Why a peer method cannot run here (None: it can)."""
    if method.startswith(("liger", "cce")) and tp != 1:
        return "TP=1 only (no vocabulary-parallel path)"
    if method in ("liger_flce_output", "cce_output") and not cuda:
        return "Triton kernels: CUDA only"
    module = {"liger_grpo_output": "liger_kernel.chunked_loss",
              "liger_flce_output": "liger_kernel.transformers.functional",
              "cce_output": "cut_cross_entropy"}.get(method)  # fmt: skip
    if module is None:
        return None
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


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
    why_not = _peer_unavailable(args.method, tp, cuda)
    if why_not:
        if rank == 0:
            print(json.dumps({"method": args.method, "tp": tp, "dtype": args.dtype,
                              "skipped": why_not}), flush=True)  # fmt: skip
        dist.destroy_process_group()
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    torch.manual_seed(1234 + rank)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    t, vl, h = args.tokens, args.vocab // tp, args.hidden
    cfg = PolicyLossConfig()
    g = torch.Generator().manual_seed(0)  # identical targets/advantages on every rank
    target = torch.randint(0, args.vocab, (t,), generator=g).to(dev)
    adv = torch.where(torch.rand(t, generator=g) < 0.5, -1.0, 0.3).to(dev)
    old = (-12.0 + 0.1 * torch.randn(t, generator=g)).to(dev)
    mask = torch.ones(1, t, device=dev)
    output_layer = args.method.endswith("_output")

    if output_layer:
        hidden = (0.02 * torch.randn(t, h, device=dev)).to(dtype).requires_grad_()
        weight = (0.02 * torch.randn(vl, h, device=dev)).to(dtype).requires_grad_()
        weight.main_grad = torch.zeros(vl, h, device=dev)  # float32, as megatron's DDP
    else:
        logits = (2.0 * torch.randn(t, vl, device=dev)).to(dtype).requires_grad_()

    def to_main_grad():
        # Without gradient-accumulation fusion megatron adds .grad into main_grad.
        if weight.grad is not None:
            weight.main_grad.add_(weight.grad)
            weight.grad = None

    def surrogate_backward(logp):
        loss = aggregate(token_loss(logp.float(), old, adv, cfg).loss.view(1, -1), mask,
                         "token-mean")  # fmt: skip
        loss.backward(inputs=[hidden, weight])
        to_main_grad()
        return (hidden.grad,)

    def step():
        if args.method == "fused_output":
            out = fused_output_layer_agpo_loss(
                hidden, weight, target, adv, cfg, old_logp=old, tp_group=group,
                chunk_size=args.chunk or None,
            )  # fmt: skip
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
            return torch.autograd.grad(loss, [hidden])
        if args.method == "megatron_ce_output":
            return surrogate_backward(-vocab_parallel_cross_entropy(hidden @ weight.t(), target))
        if args.method == "liger_flce_output":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            ce = liger_fused_linear_cross_entropy(hidden, weight, target, reduction="none")
            return surrogate_backward(-ce)
        if args.method == "cce_output":
            from cut_cross_entropy import linear_cross_entropy

            return surrogate_backward(-linear_cross_entropy(hidden, weight, target,
                                                            reduction="none"))  # fmt: skip
        if args.method == "liger_grpo_output":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            rows = max(1, t // 256)  # sequences of 256 tokens: Liger chunks by sequence
            loss_fn = LigerFusedLinearGRPOLoss(
                beta=0.0, use_ref_model=False, compiled=cuda, epsilon_low=cfg.eps_low,
                epsilon_high=cfg.eps_high, loss_type="dapo",
            )  # fmt: skip
            loss = loss_fn(
                hidden.view(rows, -1, h), weight, target.view(rows, -1), mask.view(rows, -1),
                adv.view(rows, -1)[:, 0].contiguous(), old_per_token_logps=old.view(rows, -1),
            )[0]  # fmt: skip
            loss.backward(inputs=[hidden, weight])
            to_main_grad()
            return (hidden.grad,)
        if args.method == "naive":
            out = naive_agpo_loss(logits, target, adv, cfg, old_logp=old, tp_group=group)
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
        elif args.method == "megatron_ce":
            # Megatron's CE overwrites its input with the softmax, as the fused path does (bf16:
            # it makes a float32 copy first).
            logp = -vocab_parallel_cross_entropy(logits, target)
            loss = aggregate(token_loss(logp, old, adv, cfg).loss.view(1, -1), mask, "token-mean")
        else:
            out = fused_vocab_parallel_agpo_loss(
                logits, target, adv, cfg, old_logp=old, tp_group=group,
                chunk_size=args.chunk or None, inplace=True,
                compute_entropy=args.method == "fused",
            )  # fmt: skip
            loss = aggregate(out.loss.view(1, -1), mask, "token-mean")
        return torch.autograd.grad(loss, [logits])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    grads = step()  # warm-up (allocator, thread pools)
    del grads
    if output_layer:
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
        if output_layer:
            hidden.grad = None
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        grads = step()
        sync()
        del grads
        times.append(time.perf_counter() - t0)
    peaks = [None] * tp
    dist.all_gather_object(peaks, extra_gb)
    if rank == 0:
        times.sort()
        print(json.dumps({"method": args.method, "tp": tp, "dtype": args.dtype,
                          "device": args.device, "extra_gb": max(peaks),
                          "time_s": times[len(times) // 2]}), flush=True)  # fmt: skip
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def mem_ratio(naive_gb: float, gb: float) -> str:
    # Below 1 MB (the resolution that matters here) the ratio is a lower bound.
    return f">{naive_gb / 1e-3:.0f}x" if gb < 1e-3 else f"{naive_gb / gb:.1f}x"


def run_one(method: str, tp: int, dtype: str, args) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
        __file__, "--worker", "--method", method, "--tokens", str(args.tokens),
        "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
        "--repeats", str(args.repeats), "--device", args.device, "--dtype", dtype,
    ]  # fmt: skip
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
    p.add_argument("--preset", choices=sorted(PRESETS), help="sets --vocab and --hidden")
    p.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="tokens per chunk in the fused paths (0: the library's per-device default)",
    )
    p.add_argument(
        "--tp",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 2 (CUDA: 1 2 with two GPUs, else 1)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: fp32 on the CPU, bf16 fp32 on CUDA")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak for the GEMM limit (H100/H200 SXM: 989)")  # fmt: skip
    p.add_argument("--plan", action="store_true",
                   help="print the presets' CUDA chunking and GEMM limits only")  # fmt: skip
    p.add_argument("--json", default="", help="also write every row and ratio to this file")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.preset:
        args.vocab, args.hidden = PRESETS[args.preset]
    if args.worker:
        args.dtype = args.dtype[0]  # one per worker process
        return worker(args)
    if args.plan:
        for name, (v, h) in PRESETS.items():
            for t in (8192, 16384):
                for tp in (1, 2):
                    print(f"{name}: {plan(t, v, h, tp, args.peak_tflops)}")
        return None
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = ["bf16", "fp32"] if args.device == "cuda" else ["fp32"]
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
        f"H={args.hidden} chunk={args.chunk} {'/'.join(args.dtype)}, median of {args.repeats}"
    )
    print("| TP | dtype | method | extra peak (GB) | time (s) | memory vs naive "
          "| time vs unfused megatron |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    ratios = []
    all_rows = []
    for dtype in args.dtype:
        for tp in args.tp:
            rows = {m: run_one(m, tp, dtype, args) for m in args.methods}
            all_rows += list(rows.values())
            ran = {m: r for m, r in rows.items() if "skipped" not in r}
            naive = ran.get("naive")
            for m, r in rows.items():
                if "skipped" in r:
                    print(f"| {tp} | {dtype} | {LABELS[m]} | - | - | {r['skipped']} | - |")
                    continue
                meg = ran.get("megatron_ce_output" if m.endswith("_output") else "megatron_ce")
                mem = f"{mem_ratio(naive['extra_gb'], r['extra_gb'])} less" if naive else "-"
                tim = f"{r['time_s'] / meg['time_s']:.2f}x" if meg else "-"
                print(f"| {tp} | {dtype} | {LABELS[m]} | {r['extra_gb']:.3f} | "
                      f"{r['time_s']:.3f} | {mem} | {tim} |", flush=True)  # fmt: skip
            for m, base in (
                ("fused", "megatron_ce"),
                ("fused_noent", "megatron_ce"),
                ("fused_output", "megatron_ce_output"),
                ("liger_grpo_output", "megatron_ce_output"),
            ):
                if m in ran and base in ran:
                    ratios.append(
                        f"TP={tp} {dtype} {m}: {ran[m]['time_s'] / ran[base]['time_s']:.2f}x "
                        f"the time of {base}, {ran[m]['extra_gb']:.3f} vs "
                        f"{ran[base]['extra_gb']:.3f} GB extra"
                    )
    vl = args.vocab // min(args.tp)
    print("ratios: " + "; ".join(ratios))
    lim = gemm_limit_ms(args.tokens, vl, args.hidden, args.peak_tflops)
    print(f"limit (computed, not measured): the output layer's 3 GEMMs at T={args.tokens} "
          f"V/TP={vl} H={args.hidden} take {lim:.2f} ms at {args.peak_tflops:.0f} TFLOP/s "
          "bf16")  # fmt: skip
    if args.json:
        record = dict(benchmark="fused_loss", date=stamp, device=args.device, where=where,
                      tokens=args.tokens, vocab=args.vocab, hidden=args.hidden,
                      dtypes=args.dtype, repeats=args.repeats, peak_tflops=args.peak_tflops,
                      rows=[r for r in all_rows if "skipped" not in r],
                      skipped=[r for r in all_rows if "skipped" in r], ratios=ratios)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
